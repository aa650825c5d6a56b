"""hexin's own CPU kernels (``hexin.native``): selection by CPU feature, each instruction
set's build against a dense reference, row independence, and the fallback without a
compiler. Every build this CPU can run is tested here, whatever the machine's default."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
import torch

from hexin import cpu, native, quant
from hexin.config import ModelConfig, RopeScaling, expected_shapes
from hexin.engine.blocks import BlockPool, PagedBatch
from hexin.model import Llama
from tests.conftest import force_kernels

#: (features, the build hexin picks); an x86 CPU without AVX2 gets PyTorch's kernels
SELECTION = [
    ("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512_vnni", "avx512_vnni"),
    ("avx2,fma,f16c,avx_vnni", "avx_vnni"),  # Intel Core 12th-14th gen
    ("avx2,fma,f16c", "avx2"),  # AMD Zen 2/3
    ("avx2,fma,f16c,avx512f", "avx2"),  # AVX-512 without VNNI: the AVX2 build
]
#: instruction set -> the CPU feature it needs to run here
RUNS_ON = {"avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "avx2": "avx2", "generic": None}


@pytest.mark.parametrize(("features", "isa"), SELECTION)
def test_the_build_follows_the_features(monkeypatch, features, isa):
    force_kernels(monkeypatch, features, None)
    assert cpu.own_isa() == isa
    force_kernels(monkeypatch, features, "0")
    assert cpu.own_isa() is None  # HEXIN_NATIVE=0: PyTorch's kernels
    force_kernels(monkeypatch, "sse4_2", None)
    if cpu.platform.machine() == "x86_64":
        assert cpu.own_isa() is None


def test_no_scalar_kernel_is_selected_on_this_machine(monkeypatch):
    """On an x86 CPU with AVX2 every decode role runs a SIMD build of hexin's kernels (the
    portable C is only ever chosen by hand), and prompts never reach PyTorch's scalar int8
    loop (``cpu.int8_kernel``)."""
    force_kernels(monkeypatch, None, None)
    if "avx2" not in cpu.features():
        pytest.skip("not an AVX2 machine")
    assert cpu.own_isa() in ("avx512_vnni", "avx_vnni", "avx2")
    if native.kernels() is not None:
        assert native.kernels().isa == cpu.own_isa()  # type: ignore[union-attr]
        assert "hexin's own" in cpu.kernels()["decode (q4)"]
    found = cpu.features()
    if {"amx_tile", "amx_int8"} <= found and native.kernels() is not None:
        assert cpu.int8_kernel() == "amx" and native.kernels().amx  # type: ignore[union-attr]
    else:
        assert cpu.int8_kernel() == "vnni" or "avx512_vnni" not in found


@pytest.fixture(params=list(RUNS_ON))
def kernels(request):
    need = RUNS_ON[request.param]
    if need and need not in cpu.features():
        pytest.skip(f"this CPU has no {need}")
    if (cc := cpu.c_compiler()) is None:
        pytest.skip("no C compiler")
    return native.Kernels(native.build(request.param, cc))


def random_q4(
    n: int, k: int, g: torch.Generator, tiles: int = 0
) -> tuple[native.Q4Weight, torch.Tensor]:
    """A random 4-bit weight (in the ``tiles`` layout) and the dense weight it encodes."""
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // 32, generator=g) * 0.01).half().float()
    zero = (torch.randn(n, k // 32, generator=g) * 0.02).half().float()
    weight = native.Q4Weight(q, scale, zero, tiles=tiles)
    d, m = scale, (zero - 8 * scale).half().float()  # what the kernel holds, in fp16
    return weight, (q.float().view(n, -1, 32) * d[..., None] + m[..., None]).view(n, k)


def random_weight(
    bits: int, n: int, k: int, g: torch.Generator, kernels: native.Kernels, tiles: int = 0
) -> tuple[native.BlockWeight, torch.Tensor]:
    if bits == 4:
        return random_q4(n, k, g, tiles)
    dense = torch.randn(n, k, generator=g) * 0.05
    return native.Q8Weight(dense, signed=kernels.q8_signed or bool(tiles), tiles=tiles), dense


@pytest.mark.parametrize("k", [32, 64, 96, 576, 608])  # one block, a pair, a pair + 1, ...
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", ["rows", "tiles"])
def test_each_build_matches_the_dense_product_and_rows_stay_independent(kernels, k, bits, layout):
    if layout == "tiles" and not kernels.tiles:
        pytest.skip(f"the {kernels.isa} build has no tile layout")
    tiles = kernels.tiles if layout == "tiles" else 0
    g = torch.Generator().manual_seed(k + bits)
    weight, dense = random_weight(bits, 48 if tiles else 37, k, g, kernels, tiles)
    x = torch.randn(9, k, generator=g)
    exact = x.double() @ dense.double().T
    for terms, tolerance in ((1, 0.03), (2, 0.01 if bits == 4 else 0.03)):
        y = kernels.linear(weight, x, terms=terms)
        error = ((y.double() - exact).norm() / exact.norm()).item()
        assert error < tolerance, f"{kernels.isa} {bits}-bit, {terms} terms: error {error:.4f}"
        # each row alone gives the same bits as in a batch of 9
        alone = torch.cat([kernels.linear(weight, x[i : i + 1], terms=terms) for i in range(9)])
        assert torch.equal(alone, y)


def test_two_terms_are_much_closer_than_one(kernels):
    g = torch.Generator().manual_seed(1)
    weight, dense = random_q4(64, 576, g)
    x = torch.randn(4, 576, generator=g)
    exact = x.double() @ dense.double().T
    err = [(kernels.linear(weight, x, terms=t).double() - exact).norm() for t in (1, 2)]
    assert err[1] < err[0] / 20  # 15-bit activations vs 8-bit


def test_without_a_compiler_hexin_says_so_and_runs_pytorch_kernels(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang on it
    monkeypatch.delenv("CC", raising=False)
    force_kernels(monkeypatch, None, None)
    try:
        assert native.kernels() is None
        assert (
            "no C compiler found: running PyTorch's kernels instead (slower)"
            in capfd.readouterr().err
        )
    finally:
        native.kernels.cache_clear()


@pytest.mark.parametrize("isa", list(RUNS_ON))
def test_the_source_compiles_without_warnings(isa):
    """Users' compilers build it quietly (warnings are not errors there: a newer compiler's
    new warning must not cost anyone the kernels)."""
    if (cc := cpu.c_compiler()) is None:
        pytest.skip("no C compiler")
    cmd = [cc, *native.COMMON_FLAGS, *native.ISA_FLAGS[isa], "-Wall", "-Wextra", "-fsyntax-only"]
    done = subprocess.run([*cmd, str(native.SOURCE)], capture_output=True, text=True)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr


def test_a_build_is_compiled_once_and_reused(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("HEXIN_HOME", str(tmp_path))
    cc = cpu.c_compiler()
    if cc is None:
        pytest.skip("no C compiler")
    first = native.build("generic", cc)
    assert "compiling CPU kernels for generic" in capfd.readouterr().err
    assert native.build("generic", cc) == first and first.parent == tmp_path / "kernels"
    assert capfd.readouterr().err == ""  # the second time, nothing to compile


def test_a_model_keeps_the_build_it_was_made_for(default_model, monkeypatch):
    """Weights are laid out for one build (8-bit ones signed for AVX2, offset for VNNI): a
    model keeps that build when the selection changes later, and computes what it did."""
    if "avx2" not in cpu.features() or cpu.c_compiler() is None:
        pytest.skip("needs AVX2 and a C compiler")
    force_kernels(monkeypatch, "avx2,fma,f16c", None)
    model = Llama.from_loaded(default_model, quant="q4")
    assert model.kernels is not None and model.kernels.isa == "avx2"

    def step() -> torch.Tensor:
        cache = model.new_cache()
        model.forward(torch.tensor([[1, 504, 3458]]), cache)
        return model.forward(torch.tensor([[314]]), cache)

    before = step()
    force_kernels(monkeypatch, None, "0")  # now PyTorch's kernels for new models
    assert torch.equal(step(), before)
    native.kernels.cache_clear()


@pytest.fixture
def amx_kernels(monkeypatch):
    """The build with the AMX kernel, where this CPU and Linux let it run."""
    force_kernels(monkeypatch, None, None)
    if not {"amx_tile", "amx_int8"} <= cpu.detected():
        pytest.skip("this CPU has no AMX")
    found = native.kernels()
    if found is None or not found.amx:
        pytest.skip("no C compiler, or Linux did not grant AMX's tile state")
    return found


@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize(("rows", "k", "n"), [(1, 64, 16), (17, 576, 48), (40, 1536, 96)])
def test_amx_int8_linear_is_bitwise_pytorchs(amx_kernels, monkeypatch, terms, rows, k, n):
    """AMX's tiles give the integer sums oneDNN gives, and the rounding and scaling around
    them are PyTorch's: the same values bit for bit, for any number of rows (padding to
    the tile's 16 rows, a lone tile of 16 outputs), each row alone as in the batch."""
    g = torch.Generator().manual_seed(rows * k + n)
    weight, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g) * 3
    amx = quant.Int8Linear(weight, terms=terms)
    assert amx.amx is not None
    q = torch.round(weight / amx.scale[:, None]).to(torch.int8)
    assert torch.equal(amx.amx.rows(torch.arange(n)), q)
    pytorch = quant._int8_matmul_eager if terms == 2 else quant._int8_matmul_one_term
    y = amx(x)
    assert torch.equal(y, pytorch(x, q, amx.scale))
    assert torch.equal(amx(x[-1:]), y[-1:])


def test_amx_needs_whole_tiles(amx_kernels):
    """Shapes AMX's packing cannot take run through PyTorch's int8 kernel instead."""
    assert quant.Int8Linear(torch.randn(40, 64)).amx is None  # 40 outputs: not whole tiles
    assert quant.Int8Linear(torch.randn(32, 96)).amx is None  # 96 inputs: not whole tiles
    assert quant.Int8Linear(torch.randn(32, 128)).amx is not None


@pytest.mark.parametrize("bits", [4, 8])
def test_tiled_weights_give_the_same_bits_on_vnni_and_on_amx(amx_kernels, bits):
    """A few rows go through VNNI, many through the tile unit (``AMX_MIN_ROWS``): both
    give the same bits, so a row's result never depends on how many others share its
    step; and VNNI alone gives them too (the build without AMX)."""
    g = torch.Generator().manual_seed(bits)
    k = 608  # 19 blocks
    tiles = {}
    for layout in (native.TILES_AMX, native.TILES_VNNI):
        tiles[layout], dense = random_weight(
            bits, 48, k, torch.Generator().manual_seed(1), amx_kernels, layout
        )
    x = torch.randn(40, k, generator=g)
    exact = x.double() @ dense.double().T
    for terms in (1, 2):
        y = amx_kernels.linear(tiles[native.TILES_AMX], x, terms=terms)
        assert ((y.double() - exact).norm() / exact.norm()).item() < 0.03
        assert torch.equal(amx_kernels.linear(tiles[native.TILES_VNNI], x, terms=terms), y)
        for rows in (1, 8, 12, 13, 16, 17):  # VNNI, and the tile unit from 13 rows on
            assert torch.equal(
                amx_kernels.linear(tiles[native.TILES_AMX], x[-rows:], terms=terms), y[-rows:]
            )


# -- a decode layer in one call (``hx_decode_layer``) against the op-by-op path -------------

#: Llama's layer at a shape the AVX-512 build's register-blocked attention takes (head_dim
#: 64, two query heads per kv head), H * D unlike the hidden size as in Qwen3
LAYER = ModelConfig(
    vocab_size=96,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    intermediate_size=160,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
)
LONGROPE = RopeScaling(
    factor=1.0,
    rope_type="longrope",
    original_max_position_embeddings=32,
    short_factor=tuple(1.0 + 0.1 * i for i in range(32)),
    long_factor=tuple(1.0 + 0.6 * i for i in range(32)),
    attention_factor=1.2,
)
#: what each family adds to Llama's layer: Qwen2's Q/K/V bias, Qwen3's q/k norms, Mistral's
#: window on every layer, Qwen2's on some, all of those at once, and Phi-3's LongRoPE (its
#: rotation comes precomputed, the factor in cos and sin). Windows of 6 keys: shorter than
#: every sequence here and unaligned with the 4-token blocks of the cache
FEATURES = {
    "llama": {},
    "qkv_bias": {"qkv_bias": True},
    "qk_norm": {"qk_norm": True},
    "window": {"sliding_window": 6},
    "window_some_layers": {
        "sliding_window": 6,
        "layer_types": ("full_attention", "sliding_attention"),
    },
    "qwen_all": {"qkv_bias": True, "qk_norm": True, "sliding_window": 6},
    "longrope": {"rope_scaling": LONGROPE},
}
#: Bound on ||fused - op by op|| / ||op by op|| over the decode steps' logits. The paths
#: differ in rounding only: the op-by-op path attends in bf16 (queries and the attention
#: output rounded to bf16, ``Llama.forward``) where the kernel keeps fp32, and its norms sum
#: in another order, which can move an activation across an int8 rounding step. Measured
#: 4.3e-3 to 5.5e-3 on every build, the same for Llama's layer as the kernel ran it before
#: (the "llama" case) as for each feature; 4e-4 to 1e-3 with the op-by-op path made to
#: attend in fp32, so bf16 attention is most of it. Bound 1.5e-2, about 3x. A feature left
#: out changes the logits by 0.25 to 1.07 (each case's second check asks for 10x the bound).
FUSED_VS_OPS = 1.5e-2


@pytest.fixture(params=list(RUNS_ON))
def own_build(request, monkeypatch):
    """Each build of hexin's own kernels this CPU can run, as the one models get."""
    need = RUNS_ON[request.param]
    force_kernels(monkeypatch, None, None)
    if need and need not in cpu.features():
        pytest.skip(f"this CPU has no {need}")
    if cpu.c_compiler() is None:
        pytest.skip("no C compiler")
    force_kernels(monkeypatch, None, request.param)
    yield request.param
    monkeypatch.undo()
    cpu.features.cache_clear()
    native.kernels.cache_clear()


class StoredQ4:
    """A Q4_0 tensor as a GGUF file hands it to the model (``GGUFTensor.int4_groups``)."""

    is_int4 = True

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.groups = (q, scale, torch.zeros_like(scale))

    def int4_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.groups


def random_q4_model(config: ModelConfig, seed: int = 0) -> tuple[dict, dict]:
    """Dense weights and the stored Q4_0 projections of a random model (the dense copy, which
    prompts run, is what the blocks encode). Norm weights and biases far from 1 and 0, so
    every part of the layer shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    dense, stored = {}, {}
    for name, shape in expected_shapes(config, lm_head=True).items():
        if name.endswith("proj.weight"):
            n, k = shape
            q = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
            scale = (0.01 + 0.02 * torch.rand(n, k // 32, generator=g)).half().float()
            stored[name] = StoredQ4(q, scale)
            dense[name] = ((q.float() - 8).view(n, -1, 32) * scale[..., None]).view(n, k)
        elif name.endswith("norm.weight"):
            dense[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            dense[name] = 0.5 * torch.randn(shape, generator=g)
        else:  # the embedding and the LM head
            dense[name] = torch.randn(shape, generator=g) * (1.0 if "embed" in name else 0.1)
    return dense, stored


def paged_decode(model: Llama, *, fused: bool, steps: int = 6) -> torch.Tensor:
    """Logits (steps, 2, V) of two sequences (prompts of 9 and 14 tokens) decoded together
    in a paged cache of 4-token blocks, each sequence's blocks handed out in reverse, so
    windows start mid-block and blocks are not in order; through the native layer
    (``fused``) or op by op (the model without ``fused``, as other families ran)."""
    g = torch.Generator().manual_seed(5)
    lengths = [9, 14]
    pool = BlockPool(model.config, 16, block_size=4, dtype=torch.bfloat16)
    tables = [[pool.allocate() for _ in range(-(-(n + steps) // 4))][::-1] for n in lengths]
    prompts = torch.randint(3, model.config.vocab_size, (2, max(lengths)), generator=g)
    kept = model.fused
    model.fused = model.fused if fused else None
    try:
        model.forward(prompts, PagedBatch.of(pool, tables, [0, 0], lengths))
        out = []
        for s in range(steps):
            tokens = torch.randint(3, model.config.vocab_size, (2, 1), generator=g)
            view = PagedBatch.of(pool, tables, [n + s for n in lengths], [1, 1])
            out.append(model.forward(tokens, view))
    finally:
        model.fused = kept
    return torch.stack(out)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("feature", list(FEATURES))
def test_the_one_call_decode_layer_gives_what_the_op_by_op_path_gives(own_build, feature):
    """Qwen2's bias, Qwen3's q/k norms, sliding windows and LongRoPE in the native layer, on
    each build: its decode steps close to the op-by-op path's (see ``FUSED_VS_OPS``), and
    far from that path without the feature, so the feature itself is what agrees."""
    config = dataclasses.replace(LAYER, **FEATURES[feature])
    dense, stored = random_q4_model(config)
    model = Llama(config, dense, quant="q4", quantized=stored)
    assert model.fused is not None and model.kernels is not None
    assert model.kernels.isa == own_build
    ops_path = paged_decode(model, fused=False)
    error = _relative(paged_decode(model, fused=True), ops_path)
    assert error < FUSED_VS_OPS, f"{own_build} {feature}: {error:.2e}"
    if feature != "llama":
        plain = Llama(LAYER, dense, quant="q4", quantized=stored)
        assert _relative(paged_decode(plain, fused=False), ops_path) > 10 * FUSED_VS_OPS


def test_layer_struct_refuses_a_tensor_the_kernel_would_misread():
    """The kernel reads the bias and norms through raw pointers: a strided, half-precision
    or misshapen one is refused rather than read wrong."""
    config = dataclasses.replace(LAYER, qkv_bias=True, qk_norm=True)
    norm = torch.ones(config.hidden_size)
    g = torch.Generator().manual_seed(0)
    weights = (random_q4(64, 128, g)[0],) * 4
    width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    heads = (config.num_heads + config.num_kv_heads, config.head_dim)
    good = native.layer_struct(
        config, norm, norm, weights, qkv_bias=torch.zeros(width), qk_norm=torch.ones(heads)
    )
    assert good.qkv_bias and good.qk_norm and good.window == 0
    plain = native.layer_struct(config, norm, norm, weights, window=6)
    assert not plain.qkv_bias and not plain.qk_norm and plain.window == 6
    for bad in (
        {"qkv_bias": torch.zeros(2 * width)[::2]},
        {"qkv_bias": torch.zeros(width, dtype=torch.bfloat16)},
        {"qk_norm": torch.ones(heads[1], heads[0]).T},
        {"qk_norm": torch.ones(heads[0] - 1, heads[1])},
    ):
        with pytest.raises(ValueError, match="native decode layer"):
            native.layer_struct(config, norm, norm, weights, **bad)
