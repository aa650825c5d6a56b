"""hexin's own CPU kernels (``hexin.native``): selection by CPU feature, each instruction
set's build against a dense reference, row independence, and the fallback without a
compiler. Every build this CPU can run is tested here, whatever the machine's default."""

from __future__ import annotations

import subprocess

import pytest
import torch

from hexin import cpu, native, quant
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
    from hexin.model import Llama

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
