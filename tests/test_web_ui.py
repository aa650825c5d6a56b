"""End-to-end tests of the web UI (src/hexin/web) in a real browser.

A real ``hexin serve`` runs in a subprocess on the default GGUF model (started by
tests/server_util.py's ``Server``, as in the server tests); headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright for Python) uses the page the way a person would.
Replies are greedy and short: the model decodes a few dozen tokens a second on a CPU
shared with everything else, so waits for generated text are generous.

Screenshots of the main states land in docs/screenshots/ (committed; desktop and phone
width, light and dark), others in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_util import Server, key_subprotocols, recv_session
from websockets.exceptions import ConnectionClosed

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip(
        "the web UI tests need Playwright for Python: pip install playwright",
        allow_module_level=True,
    )

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():  # pragma: no cover - depends on the machine
    pytest.skip(
        "the web UI tests need Debian's Chromium at /usr/bin/chromium: apt-get install chromium",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GEN_MS = 180_000  # waiting for a reply on a busy CPU
UI_MS = 15_000  # waiting for the page to react
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


# -- the server ------------------------------------------------------------------------------
class WebServer(Server):
    """The server tests' ``hexin serve`` process, with the few REST calls these tests make
    to set up conversations and read back what the page did."""

    @property
    def base(self) -> str:
        return self.url

    def request(self, method: str, path: str, body: Any = None) -> Any:
        with self.http() as client:
            r = client.request(method, path, json=body)
        r.raise_for_status()
        return r.json() if r.content else None

    def status(self, path: str) -> int:
        with self.http(timeout=10) as client:
            return client.get(path).status_code

    def new_session(self, **params: Any) -> str:
        body = {"params": {"temperature": 0, "max_tokens": 8, **params}}
        return self.request("POST", "/api/sessions", body)["id"]

    def import_session(
        self, title: str, turns: list[tuple[str, str]], last_meta: dict | None = None
    ) -> str:
        """A finished conversation, without generating: (user, assistant) pairs; the last
        reply may carry usage figures (``meta``) as the server records them."""
        messages, parent, t = [], None, time.time()
        for i, (user, reply) in enumerate(turns):
            for role, content in (("user", user), ("assistant", reply)):
                mid = uuid.uuid4().hex[:16]
                messages.append(
                    {
                        "id": mid,
                        "parent_id": parent,
                        "role": role,
                        "content": content,
                        "created_at": t + i * 0.01 + (0.005 if role == "assistant" else 0),
                    }
                )
                parent = mid
        if last_meta:
            messages[-1]["meta"] = last_meta
        body = {
            "id": "imp" + uuid.uuid4().hex[:12],
            "title": title,
            "messages": messages,
            "active_id": parent,
            "params": {"temperature": 0, "max_tokens": 8},
        }
        return self.request("POST", "/api/sessions/import", body)["id"]


@pytest.fixture(scope="module")
def server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    # small prefill chunks: a long prompt's progress shows in many steps on any CPU
    extra = ("--prefill-chunk", "64")
    srv = WebServer(default_gguf, tmp_path_factory.mktemp("hexin-web"), extra=extra).start()
    try:
        assert srv.status("/") == 200, "the server does not serve the web UI at /"
        yield srv
    finally:
        srv.stop()


# -- the browser -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, server: WebServer) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP, color_scheme="light", base_url=server.base)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def shot(pg: Page, name: str, *, docs: bool = False) -> Path:
    """A screenshot in tests/artifacts/, or with ``docs`` in docs/screenshots/ (committed,
    named in the README, so that the UI's main states can be seen without running it)."""
    folder = SCREENSHOTS if docs else ARTIFACTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pg.screenshot(path=str(path))
    assert path.stat().st_size > 5000
    return path


def open_chat(pg: Page, session_id: str) -> None:
    pg.goto(f"/#/c/{session_id}")
    expect(pg.get_by_test_id("connection")).to_have_attribute("data-state", "open", timeout=UI_MS)


def assistant_done(pg: Page):
    return pg.locator("[data-testid=message][data-role=assistant]:not([data-streaming])")


def wait_replies(pg: Page, count: int) -> None:
    """Wait until the path shows ``count`` finished replies and the composer is idle."""
    expect(assistant_done(pg)).to_have_count(count, timeout=GEN_MS)
    expect(pg.get_by_test_id("send")).to_be_visible(timeout=GEN_MS)


def watch_growth(pg: Page, steps: int = 3) -> list[int]:
    """Sample the streaming reply until its text has grown ``steps`` times; the lengths."""
    body = pg.locator("[data-testid=message][data-streaming=true] [data-testid=message-content]")
    lengths: list[int] = []
    deadline = time.monotonic() + GEN_MS / 1000
    while len(lengths) < steps:
        assert time.monotonic() < deadline, f"the reply did not stream: {lengths}"
        with contextlib.suppress(PlaywrightError):
            if body.count():
                n = len(body.inner_text(timeout=1000))
                if n and (not lengths or n > lengths[-1]):
                    lengths.append(n)
        pg.wait_for_timeout(40)
    return lengths


def set_sampling(pg: Page, *, temperature: str = "0", max_tokens: str) -> None:
    pg.get_by_test_id("open-settings").click()
    dialog = pg.get_by_test_id("settings-dialog")
    expect(dialog).to_be_visible()
    pg.get_by_test_id("set-temperature").fill(temperature)
    pg.get_by_test_id("set-max-tokens").fill(max_tokens)
    pg.get_by_test_id("settings-save").click()
    expect(dialog).to_be_hidden()


def session_id_from_url(pg: Page) -> str:
    match = re.search(r"#/c/([A-Za-z0-9_-]+)$", pg.url)
    assert match, pg.url
    return match.group(1)


# -- tests -----------------------------------------------------------------------------------
def test_new_chat_streams_stops_and_shows_stats(page: Page, server: WebServer) -> None:
    pg = page
    pg.goto("/")
    expect(pg.get_by_test_id("status-model")).to_contain_text("SmolLM2", timeout=UI_MS)
    expect(pg.get_by_test_id("empty-chat")).to_be_visible()
    # settings of a chat not yet created are applied when it is
    set_sampling(pg, max_tokens="400")
    box = pg.get_by_test_id("chat-input")
    box.fill("Tell me a long story about a brave little dragon")
    box.press("Shift+Enter")  # a new line, not a send
    box.press_sequentially("and a wise old owl.")
    assert box.input_value().count("\n") == 1
    box.press("Enter")

    expect(pg).to_have_url(re.compile(r"#/c/[A-Za-z0-9_-]+$"), timeout=UI_MS)
    sid = session_id_from_url(pg)
    user = pg.locator("[data-testid=message][data-role=user]")
    expect(user).to_have_count(1, timeout=UI_MS)
    expect(user.get_by_test_id("message-content")).to_have_text(
        "Tell me a long story about a brave little dragon\nand a wise old owl."
    )
    lengths = watch_growth(pg)
    assert lengths == sorted(lengths) and len(set(lengths)) == 3
    expect(pg.get_by_test_id("stop")).to_be_visible()
    pg.get_by_test_id("stop").click()
    wait_replies(pg, 1)
    reply = assistant_done(pg).last
    expect(reply).to_have_attribute("data-status", "stopped")
    expect(reply.get_by_test_id("stopped-badge")).to_be_visible()

    stored = server.request("GET", f"/api/sessions/{sid}")
    assert stored["params"]["temperature"] == 0 and stored["params"]["max_tokens"] == 400
    last = stored["path"][-1]
    assert last["role"] == "assistant" and last["status"] == "stopped"
    assert 0 < last["meta"]["completion_tokens"] < 400

    # the status bar describes the last reply
    expect(pg.get_by_test_id("status-speed")).to_contain_text("tok/s")
    expect(pg.get_by_test_id("status-ttft")).to_contain_text(re.compile(r"TTFT \d+ ms"))
    expect(pg.get_by_test_id("status-context-text")).to_contain_text("/ 8,192 tokens")
    expect(pg.get_by_test_id("status-cached")).to_contain_text("cached")
    assert float(pg.get_by_test_id("status-context").get_attribute("aria-valuenow")) > 0
    expect(pg.get_by_test_id("status-dropped")).to_be_hidden()

    # Esc stops a reply too
    box.fill("And then what happened to the dragon?")
    box.press("Enter")
    watch_growth(pg, steps=2)
    pg.keyboard.press("Escape")
    wait_replies(pg, 2)
    expect(assistant_done(pg).last).to_have_attribute("data-status", "stopped")

    # the sidebar lists the new conversation, highlighted, titled by its first message
    item = pg.locator(f"[data-testid=session-item][data-id='{sid}']")
    expect(item).to_have_class(re.compile(r"\bactive\b"))
    expect(item.get_by_test_id("session-title")).to_have_text(
        "Tell me a long story about a brave little dragon"
    )


def test_regenerate_pager_edit_branch_rollback_reload(page: Page, server: WebServer) -> None:
    pg = page
    sid = server.new_session(max_tokens=6)
    open_chat(pg, sid)
    pg.get_by_test_id("chat-input").fill("Name a colour.")
    pg.get_by_test_id("chat-input").press("Enter")
    wait_replies(pg, 1)
    expect(pg.get_by_test_id("version-pager")).to_have_count(0)

    # regenerate: a second version of the reply, with a < 2/2 > pager
    pg.get_by_test_id("regenerate").click()
    wait_replies(pg, 1)
    reply = assistant_done(pg)
    expect(reply.get_by_test_id("version-label")).to_have_text("2/2", timeout=UI_MS)
    stored = server.request("GET", f"/api/sessions/{sid}")["messages"]
    replies = [m["id"] for m in stored if m["role"] == "assistant"]  # oldest first
    assert len(replies) == 2
    reply.get_by_test_id("version-prev").click()
    expect(reply.get_by_test_id("version-label")).to_have_text("1/2", timeout=UI_MS)
    expect(reply.get_by_test_id("version-prev")).to_be_disabled()
    assert server.request("GET", f"/api/sessions/{sid}")["active_id"] == replies[0]
    reply.get_by_test_id("version-next").click()
    expect(reply.get_by_test_id("version-label")).to_have_text("2/2", timeout=UI_MS)

    # edit the user message: a new branch, the old one behind the user message's pager
    user = pg.locator("[data-testid=message][data-role=user]")
    user.get_by_test_id("edit-message").click()
    editor = pg.get_by_test_id("edit-input")
    expect(editor).to_have_value("Name a colour.")
    editor.fill("Name an animal.")
    pg.get_by_test_id("edit-save").click()
    wait_replies(pg, 1)
    expect(user.get_by_test_id("message-content")).to_have_text("Name an animal.")
    expect(user.get_by_test_id("version-label")).to_have_text("2/2", timeout=UI_MS)
    expect(assistant_done(pg).get_by_test_id("version-pager")).to_have_count(0)
    user.get_by_test_id("version-prev").click()
    expect(user.get_by_test_id("message-content")).to_have_text("Name a colour.", timeout=UI_MS)
    expect(user.get_by_test_id("version-label")).to_have_text("1/2")
    expect(assistant_done(pg).get_by_test_id("version-label")).to_have_text("2/2")
    user.get_by_test_id("version-next").click()
    expect(user.get_by_test_id("message-content")).to_have_text("Name an animal.", timeout=UI_MS)

    # a second turn, then roll it back
    pg.get_by_test_id("chat-input").fill("Another one?")
    pg.get_by_test_id("chat-input").press("Enter")
    wait_replies(pg, 2)
    messages = pg.get_by_test_id("message")
    expect(messages).to_have_count(4)
    assistant_done(pg).last.get_by_test_id("rollback").click()
    expect(messages).to_have_count(3, timeout=UI_MS)
    expect(messages.last).to_have_attribute("data-role", "user")
    path = server.request("GET", f"/api/sessions/{sid}")["path"]
    assert [m["role"] for m in path] == ["user", "assistant", "user"]

    # reload: the URL carries the session, which comes back as it was
    pg.reload()
    expect(pg.get_by_test_id("connection")).to_have_attribute("data-state", "open", timeout=UI_MS)
    expect(messages).to_have_count(3)
    expect(messages.nth(0).get_by_test_id("message-content")).to_have_text("Name an animal.")
    expect(messages.nth(0).get_by_test_id("version-label")).to_have_text("2/2")
    expect(messages.nth(2).get_by_test_id("message-content")).to_have_text("Another one?")
    expect(pg.get_by_test_id("chat-title")).to_have_text("Name a colour.")
    expect(messages.last.get_by_test_id("rollback")).to_have_count(1)
    # the question left without an answer can be answered again
    messages.last.get_by_test_id("reply").click()
    wait_replies(pg, 2)
    expect(messages).to_have_count(4)
    assert len(server.request("GET", f"/api/sessions/{sid}")["path"]) == 4


def test_sidebar_navigation_search_rename_delete(page: Page, server: WebServer) -> None:
    pg = page
    tag = uuid.uuid4().hex[:6]
    older = server.import_session(
        f"Volcano notes {tag}", [("Tell me about lava", "Lava is molten rock.")]
    )
    newer = server.import_session(
        f"Penguin facts {tag}", [("What do penguins eat?", f"Mostly krill{tag} and fish.")]
    )
    pg.goto("/")
    items = pg.get_by_test_id("session-item")
    expect(items.first).to_have_attribute("data-id", newer, timeout=UI_MS)  # newest first
    expect(items.nth(1)).to_have_attribute("data-id", older)

    # open one from the list: the URL follows, the item is highlighted
    pg.locator(f"[data-testid=session-item][data-id='{older}'] a").click()
    expect(pg).to_have_url(re.compile(f"#/c/{older}$"))
    expect(pg.get_by_test_id("message").last).to_contain_text("Lava is molten rock.")
    active = pg.locator("[data-testid=session-item].active")
    expect(active).to_have_attribute("data-id", older)
    expect(active.locator("a")).to_have_attribute("aria-current", "page")
    pg.locator(f"[data-testid=session-item][data-id='{newer}'] a").click()
    expect(pg.get_by_test_id("message").last).to_contain_text("Mostly krill")
    # back and forward move between conversations
    pg.go_back()
    expect(pg).to_have_url(re.compile(f"#/c/{older}$"))
    expect(pg.get_by_test_id("message").last).to_contain_text("Lava is molten rock.")
    pg.go_forward()
    expect(pg.get_by_test_id("message").last).to_contain_text("Mostly krill")
    pg.reload()
    expect(pg.get_by_test_id("message").last).to_contain_text("Mostly krill", timeout=UI_MS)
    expect(pg.get_by_test_id("chat-title")).to_have_text(f"Penguin facts {tag}")

    # search matches titles and message text
    search = pg.get_by_test_id("session-search")
    search.fill(f"krill{tag}")
    expect(items).to_have_count(1, timeout=UI_MS)
    expect(items.first).to_have_attribute("data-id", newer)
    search.fill(f"volcano notes {tag}")
    expect(items).to_have_count(1, timeout=UI_MS)
    expect(items.first).to_have_attribute("data-id", older)
    search.fill("")
    expect(pg.locator(f"[data-testid=session-item][data-id='{older}']")).to_have_count(1)
    expect(items.first).to_have_attribute("data-id", newer, timeout=UI_MS)

    # rename inline
    item = pg.locator(f"[data-testid=session-item][data-id='{newer}']")
    item.get_by_test_id("session-rename").click()
    field = pg.get_by_test_id("rename-input")
    expect(field).to_be_focused()
    field.fill(f"Birds {tag}")
    field.press("Enter")
    expect(item.get_by_test_id("session-title")).to_have_text(f"Birds {tag}", timeout=UI_MS)
    expect(pg.get_by_test_id("chat-title")).to_have_text(f"Birds {tag}")
    assert server.request("GET", f"/api/sessions/{newer}")["title"] == f"Birds {tag}"

    # delete: gone from the list at once, with an Undo that brings it back; deleted on
    # the server only once the undo time is up
    item.get_by_test_id("session-delete").click()
    expect(item).to_have_count(0)
    expect(pg).to_have_url(re.compile(r"#/$"))
    undo = pg.get_by_test_id("toast").filter(has_text=f"Birds {tag}").get_by_test_id("toast-action")
    undo.click()
    expect(item).to_have_count(1, timeout=UI_MS)
    assert server.status(f"/api/sessions/{newer}") == 200
    item.get_by_test_id("session-delete").click()
    expect(item).to_have_count(0)
    expect(pg.get_by_test_id("empty-chat")).to_be_visible()
    deadline = time.monotonic() + 15
    while server.status(f"/api/sessions/{newer}") != 404 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.status(f"/api/sessions/{newer}") == 404
    pg.wait_for_timeout(5500)  # a poll of the list does not bring it back
    expect(item).to_have_count(0)
    # an old link to it says so instead of creating it again
    pg.goto(f"/#/c/{newer}")
    expect(pg.get_by_test_id("missing")).to_be_visible(timeout=UI_MS)
    assert server.status(f"/api/sessions/{newer}") == 404


def test_model_output_html_renders_as_text(page: Page, server: WebServer) -> None:
    pg = page
    evil = (
        'Look: <img src=x onerror="window.__xss = 1"> and '
        "<script>window.__xss = 2</script>\n\n"
        "<iframe src=javascript:window.__xss=3></iframe>\n\n"
        "[click](javascript:window.__xss=4) ![pic](x onerror=alert(1))\n\n"
        "```html\n<b>bold?</b>\n```\n\n**real bold**"
    )
    sid = server.import_session("xss check", [('<img src=y onerror="window.__xss = 5">', evil)])
    open_chat(pg, sid)
    reply = pg.locator("[data-testid=message][data-role=assistant] [data-testid=message-content]")
    expect(reply).to_contain_text('<img src=x onerror="window.__xss = 1">')
    expect(reply).to_contain_text("<script>window.__xss = 2</script>")
    expect(reply).to_contain_text("<iframe src=javascript:window.__xss=3></iframe>")
    expect(reply.locator("strong")).to_have_text("real bold")  # markdown still renders
    expect(reply.locator("pre code")).to_have_text("<b>bold?</b>")
    content = pg.locator("[data-testid=messages]")
    for tag in ("img", "script", "iframe", "b"):
        expect(content.locator(tag)).to_have_count(0)
    link = reply.locator("a")
    expect(link).to_have_count(1)
    assert link.get_attribute("href") is None  # javascript: dropped
    user = pg.locator("[data-testid=message][data-role=user] [data-testid=message-content]")
    expect(user).to_have_text('<img src=y onerror="window.__xss = 5">')
    pg.wait_for_timeout(300)
    assert pg.evaluate("window.__xss") is None
    # copy puts the raw text on the clipboard
    pg.locator("[data-testid=message][data-role=assistant]").get_by_test_id("copy-message").click()
    expect(pg.locator("[data-testid=message][data-role=assistant]")).to_contain_text("Copied")
    assert pg.evaluate("navigator.clipboard.readText()") == evil


def test_tool_calls_and_results_show_as_data(page: Page, server: WebServer) -> None:
    """A conversation whose reply called a tool: the call and the tool's result are shown
    as text (markup in them stays text), with the tool's name."""
    t = time.time()
    arguments = '{"city": "<b>Paris</b>"}'
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": arguments}
    messages = [
        {"id": "u1", "parent_id": None, "role": "user", "content": "Weather?", "created_at": t},
        {
            "id": "a1",
            "parent_id": "u1",
            "role": "assistant",
            "content": "",
            "created_at": t + 0.01,
            "meta": {"tool_calls": [call]},
        },
        {
            "id": "t1",
            "parent_id": "a1",
            "role": "tool",
            "content": "<i>sunny</i>, 21 C",
            "created_at": t + 0.02,
            "meta": {"tool_call_id": "call_1", "name": "get_weather"},
        },
        {
            "id": "a2",
            "parent_id": "t1",
            "role": "assistant",
            "content": "It is sunny.",
            "created_at": t + 0.03,
        },
    ]
    body = {"id": "tools" + uuid.uuid4().hex[:8], "title": "tools", "messages": messages}
    sid = server.request("POST", "/api/sessions/import", body | {"active_id": "a2"})["id"]
    open_chat(page, sid)
    shown = page.get_by_test_id("message")
    expect(shown).to_have_count(4)
    expect(page.get_by_test_id("tool-call")).to_have_text(f"get_weather({arguments})")
    tool = page.locator("[data-testid=message][data-role=tool]")
    expect(tool).to_contain_text("Tool result · get_weather")
    expect(tool.get_by_test_id("message-content")).to_have_text("<i>sunny</i>, 21 C")
    expect(page.locator("[data-testid=messages] b, [data-testid=messages] i")).to_have_count(0)
    expect(shown.nth(1)).not_to_contain_text("(no text)")


def test_story_mode_streams_and_stops(page: Page, server: WebServer) -> None:
    pg = page
    pg.goto("/#/story")
    expect(pg.get_by_test_id("story-prompt")).to_be_visible()
    expect(pg.get_by_test_id("tab-story")).to_have_class(re.compile(r"\bactive\b"))
    set_sampling(pg, max_tokens="300")
    pg.get_by_test_id("story-prompt").fill("Once upon a time, a little fox")
    pg.get_by_test_id("story-generate").click()
    generated = pg.get_by_test_id("story-generated")
    lengths: list[int] = []
    deadline = time.monotonic() + GEN_MS / 1000
    while len(lengths) < 3:
        assert time.monotonic() < deadline, f"the story did not stream: {lengths}"
        with contextlib.suppress(PlaywrightError):
            if generated.count():
                n = len(generated.inner_text(timeout=1000))
                if n and (not lengths or n > lengths[-1]):
                    lengths.append(n)
        pg.wait_for_timeout(40)
    expect(pg.get_by_test_id("story-output")).to_have_attribute("data-streaming", "true")
    pg.get_by_test_id("story-stop").click()
    expect(pg.get_by_test_id("story-generate")).to_be_visible(timeout=UI_MS)
    expect(pg.get_by_test_id("story-stats")).to_contain_text("stopped")
    expect(pg.get_by_test_id("story-output")).to_contain_text("Once upon a time, a little fox")
    assert len(generated.inner_text()) >= lengths[-1]

    # a short run ends by itself at max tokens; Append moves it into the prompt
    set_sampling(pg, max_tokens="5")
    pg.get_by_test_id("story-generate").click()
    expect(pg.get_by_test_id("story-stats")).to_contain_text("max tokens reached", timeout=GEN_MS)
    expect(pg.get_by_test_id("story-stats")).to_contain_text("5 tokens")
    text = generated.inner_text()
    assert text.strip()
    pg.get_by_test_id("story-continue").click()
    expect(pg.get_by_test_id("story-prompt")).to_have_value("Once upon a time, a little fox" + text)


class Outage:
    """The page's way to the server, cut and restored at will: its chat sockets (closed,
    and refused while down) and its HTTP requests (aborted while down)."""

    HTTP = re.compile(r".*/(api/|health|v1/).*")

    def __init__(self, pg: Page) -> None:
        self.pg, self.down, self.sockets = pg, False, []
        pg.route_web_socket(re.compile(r".*/c/[A-Za-z0-9_-]+(\?.*)?$"), self._socket)

    def _socket(self, ws) -> None:
        if self.down:
            ws.close()
            return
        ws.connect_to_server()
        self.sockets.append(ws)

    def cut(self) -> None:
        self.down = True
        self.pg.route(self.HTTP, lambda route: route.abort())
        for ws in self.sockets:
            ws.close()

    def restore(self) -> None:
        self.down = False
        self.pg.unroute(self.HTTP)


def test_unreachable_banner_and_reconnect(page: Page, server: WebServer) -> None:
    """Cut the page off from the server (its WebSocket closed, HTTP refused), then let it
    through again: the banner comes and goes, and the socket reconnects by itself."""
    pg = page
    sid = server.import_session("offline check", [("Hello?", "Hello! How can I help?")])
    outage = Outage(pg)
    open_chat(pg, sid)
    banner = pg.get_by_test_id("offline-banner")
    expect(banner).to_be_hidden()

    outage.cut()
    expect(banner).to_be_visible(timeout=UI_MS)
    expect(banner).to_contain_text("Cannot reach the server")
    expect(pg.get_by_test_id("connection")).to_have_attribute("data-state", "down")
    pg.get_by_test_id("session-search").fill("anything")  # an HTTP request fails too
    pg.wait_for_timeout(1500)
    expect(banner).to_be_visible()

    outage.restore()
    expect(banner).to_be_hidden(timeout=45_000)
    expect(pg.get_by_test_id("connection")).to_have_attribute("data-state", "open")
    assert len(outage.sockets) >= 2  # a new socket was opened by the page itself
    expect(pg.get_by_test_id("message").last).to_contain_text("Hello! How can I help?")


def test_api_key_is_sent_and_never_logged(
    browser: Browser, default_gguf: Path, tmp_path: Path
) -> None:
    """With --api-key, a key from the settings goes out as a bearer header on HTTP and as a
    subprotocol on the socket, never in a URL; after a whole chat the server's log holds no
    trace of it. A socket with the key in ?api_key= still works, and is logged redacted."""
    key = "k3y-" + uuid.uuid4().hex
    encoded = key_subprotocols(key)[1].removeprefix("hexin.key.")
    srv = WebServer(default_gguf, tmp_path, api_key=key).start()
    context = browser.new_context(viewport=DESKTOP, color_scheme="light", base_url=srv.base)
    errors: list[str] = []
    try:
        pg = context.new_page()
        pg.on("pageerror", lambda e: errors.append(str(e)))
        sid = srv.import_session("key check", [("Hi", "Hello.")])
        pg.goto("/")
        pg.get_by_test_id("open-settings").click()
        pg.get_by_test_id("set-api-key").fill(key)
        pg.get_by_test_id("settings-save").click()
        assert pg.evaluate("localStorage.getItem('hexin.apiKey')") == key
        with pg.expect_websocket() as ws_info, pg.expect_request("**/api/sessions/*") as req_info:
            pg.goto(f"/#/c/{sid}")
        assert key not in ws_info.value.url and "api_key" not in ws_info.value.url
        assert req_info.value.headers.get("authorization") == f"Bearer {key}"
        open_state = pg.get_by_test_id("connection")
        expect(open_state).to_have_attribute("data-state", "open", timeout=UI_MS)

        # a real turn over the socket
        box = pg.get_by_test_id("chat-input")
        box.fill("What is the capital of France?")
        box.press("Enter")
        wait_replies(pg, 2)
        expect(assistant_done(pg).last.get_by_test_id("message-content")).not_to_be_empty()

        # other clients: the subprotocol (right and wrong key) and the query string
        with srv.ws_with(sid, subprotocols=key_subprotocols(key)) as ws:
            assert ws.subprotocol == "hexin"
            assert recv_session(ws)["id"] == sid
        with srv.ws_with(sid, subprotocols=key_subprotocols("wrong")) as ws:
            with pytest.raises(ConnectionClosed) as info:
                recv_session(ws)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4401
        with srv.ws_with(sid, query=f"?api_key={key}") as ws:
            assert recv_session(ws)["id"] == sid
    finally:
        context.close()
        srv.stop()
    assert not errors, f"uncaught errors in the page: {errors}"
    log = srv.log_path.read_text(errors="replace")
    assert f'"WebSocket /c/{sid}?api_key=<redacted>"' in log, log[-3000:]
    assert key not in log and encoded not in log, log[-3000:]


def test_long_conversation_scrolls_and_reports_dropped_turns(page: Page, server: WebServer) -> None:
    pg = page
    turns = [(f"Question {i}?", "A fairly long answer. " * 30 + f"End {i}.") for i in range(12)]
    meta = {
        "prompt_tokens": 7000,
        "cached_tokens": 6000,
        "completion_tokens": 500,
        "stop_reason": "length",
        "dropped_turns": 3,
        "ttft_ms": 12.4,
        "tokens_per_s": 30.14,
    }
    sid = server.import_session("long one", turns, last_meta=meta)
    open_chat(pg, sid)
    expect(pg.get_by_test_id("message")).to_have_count(24)
    # the status bar shows the saved figures of the last reply
    expect(pg.get_by_test_id("status-dropped")).to_have_text(
        "3 older turns left out to fit the context"
    )
    expect(pg.get_by_test_id("status-speed")).to_have_text("30.1 tok/s")
    expect(pg.get_by_test_id("status-ttft")).to_have_text("TTFT 12 ms")
    expect(pg.get_by_test_id("status-cached")).to_have_text("6,000 cached")
    expect(pg.get_by_test_id("status-context-text")).to_have_text("7,500 / 8,192 tokens")
    expect(pg.get_by_test_id("status-context")).to_have_attribute("data-level", "high")
    scroller = pg.get_by_test_id("messages")
    gap = "el => el.scrollHeight - el.scrollTop - el.clientHeight"
    pg.wait_for_function(f"() => ({gap})(document.querySelector('#messages')) < 4")
    scroller.hover()
    pg.mouse.wheel(0, -1500)
    # the socket's session message may land after the REST load and re-render the chat:
    # the reader's place must hold through that
    expect(pg.get_by_test_id("jump-latest")).to_be_visible(timeout=UI_MS)
    pg.wait_for_timeout(1000)
    pg.wait_for_timeout(500)
    assert scroller.evaluate(gap) > 500
    pg.get_by_test_id("jump-latest").click()
    pg.wait_for_function(f"() => ({gap})(document.querySelector('#messages')) < 4")
    expect(pg.get_by_test_id("jump-latest")).to_be_hidden()


def import_versions(server: WebServer, question: str, replies: list[str]) -> str:
    """A conversation whose one question has several reply versions, the last active."""
    t = time.time()
    messages = [
        {"id": "q", "parent_id": None, "role": "user", "content": question, "created_at": t}
    ]
    for i, reply in enumerate(replies, 1):
        messages.append(
            {
                "id": f"r{i}",
                "parent_id": "q",
                "role": "assistant",
                "content": reply,
                "created_at": t + i,
            }
        )
    body = {"id": "v" + uuid.uuid4().hex[:12], "title": question, "messages": messages}
    return server.request("POST", "/api/sessions/import", body | {"active_id": f"r{len(replies)}"})[
        "id"
    ]


def test_rollback_keeps_the_other_versions(page: Page, server: WebServer) -> None:
    """Rolling back version 3/3 removes it and shows 2/2, the pager still there; the
    conversation never ends on a question whose answers are hidden."""
    sid = import_versions(server, "Pick a number.", ["One.", "Two.", "Three."])
    open_chat(page, sid)
    reply = assistant_done(page)
    expect(reply.get_by_test_id("version-label")).to_have_text("3/3")
    reply.get_by_test_id("rollback").click()
    expect(reply.get_by_test_id("message-content")).to_have_text("Two.", timeout=UI_MS)
    expect(reply.get_by_test_id("version-label")).to_have_text("2/2")
    reply.get_by_test_id("version-prev").click()
    expect(reply.get_by_test_id("message-content")).to_have_text("One.", timeout=UI_MS)
    stored = server.request("GET", f"/api/sessions/{sid}")
    assert sorted(m["content"] for m in stored["messages"]) == ["One.", "Pick a number.", "Two."]


def test_prompt_progress_is_shown_during_a_long_prefill(page: Page, server: WebServer) -> None:
    """A long message: before its first token the reply shows how much of the prompt is
    done, with the total; then the text replaces it."""
    pg = page
    sid = server.new_session(max_tokens=4)
    open_chat(pg, sid)
    words = " ".join(f"item{i} costs {i % 97} coins;" for i in range(260))
    pg.get_by_test_id("chat-input").fill(f"Sum these up: {words}")
    pg.get_by_test_id("chat-input").press("Enter")
    progress = pg.get_by_test_id("prompt-progress")
    expect(progress).to_be_visible(timeout=GEN_MS)
    expect(progress).to_contain_text(re.compile(r"Processing the prompt: \d+% of \d+ tokens"))
    seen = int(progress.get_attribute("data-percent"))
    assert 0 <= seen < 100
    shot(pg, "prompt-progress.png", docs=True)
    wait_replies(pg, 1)
    expect(progress).to_have_count(0)


def test_loading_state_is_consistent(page: Page, server: WebServer) -> None:
    """While the server loads its model (its config answers 503) the page says so and
    Send is disabled; once loaded it is ready."""
    pg = page
    loading = {"on": True}

    def config(route) -> None:
        if loading["on"]:
            body = '{"error": {"message": "model is loading", "type": "server_error"}}'
            route.fulfill(status=503, body=body, content_type="application/json")
        else:
            route.continue_()

    pg.route(re.compile(r".*/api/config$"), config)
    pg.goto("/")
    expect(pg.get_by_test_id("status-model")).to_have_text("loading model…", timeout=UI_MS)
    expect(pg.get_by_test_id("connection")).to_contain_text("loading model")
    expect(pg.get_by_test_id("connection")).not_to_contain_text("ready")
    expect(pg.get_by_test_id("send")).to_be_disabled()
    pg.get_by_test_id("chat-input").fill("Hello?")
    pg.get_by_test_id("chat-input").press("Enter")
    expect(pg.get_by_test_id("message")).to_have_count(0)  # nothing was sent
    loading["on"] = False
    expect(pg.get_by_test_id("status-model")).to_contain_text("SmolLM2", timeout=UI_MS)
    expect(pg.get_by_test_id("connection")).to_contain_text("ready")
    expect(pg.get_by_test_id("send")).to_be_enabled()
    expect(pg.get_by_test_id("chat-input")).to_have_value("Hello?")


def test_an_outage_never_looks_like_lost_history(page: Page, server: WebServer) -> None:
    """With the server unreachable, opening another chat says it cannot be loaded (not an
    empty chat); when the server is back it loads by itself."""
    pg = page
    first = server.import_session("outage A", [("Hi?", "Hello from A.")])
    other = server.import_session("outage B", [("Hey?", "Hello from B.")])
    outage = Outage(pg)
    open_chat(pg, first)
    outage.cut()
    expect(pg.get_by_test_id("offline-banner")).to_be_visible(timeout=UI_MS)
    pg.goto(f"/#/c/{other}")
    unavailable = pg.get_by_test_id("chat-unavailable")
    expect(unavailable).to_be_visible(timeout=UI_MS)
    expect(pg.get_by_test_id("empty-chat")).to_have_count(0)
    expect(pg.get_by_test_id("send")).to_be_disabled()
    shot(pg, "outage.png", docs=True)
    outage.restore()
    started = time.monotonic()
    expect(pg.get_by_test_id("message").last).to_contain_text("Hello from B.", timeout=30_000)
    expect(unavailable).to_have_count(0)
    assert time.monotonic() - started < 10  # back within seconds, not a long backoff


def test_drafts_are_kept_per_chat_across_reloads(page: Page, server: WebServer) -> None:
    pg = page
    a = server.import_session("draft A", [("One?", "One.")])
    b = server.import_session("draft B", [("Two?", "Two.")])
    box = pg.get_by_test_id("chat-input")
    open_chat(pg, a)
    box.fill("half a thought for A")
    open_chat(pg, b)
    expect(box).to_have_value("")  # A's text is not ready to go to B
    box.fill("something for B")
    pg.goto("/#/")
    expect(box).to_have_value("")
    open_chat(pg, a)
    pg.reload()
    expect(pg.get_by_test_id("connection")).to_have_attribute("data-state", "open", timeout=UI_MS)
    expect(box).to_have_value("half a thought for A")
    open_chat(pg, b)
    expect(box).to_have_value("something for B")
    pg.goto("/#/c/no-such-chat")
    expect(pg.get_by_test_id("missing")).to_be_visible(timeout=UI_MS)
    expect(pg.get_by_test_id("send")).to_be_disabled()


def test_phone_tab_order_and_settings_fit(browser: Browser, server: WebServer) -> None:
    """At 390x844 the closed sidebar takes no Tab stops, the settings dialog's Save is on
    screen, and the status bar is one line."""
    sid = server.import_session("phone", [("Hi?", "Hello.")])
    context = browser.new_context(
        viewport=PHONE, color_scheme="light", base_url=server.base, is_mobile=True, has_touch=True
    )
    pg = context.new_page()
    open_chat(pg, sid)
    stops = []
    for _ in range(6):
        pg.keyboard.press("Tab")
        stops.append(pg.evaluate("document.activeElement.closest('#sidebar') !== null"))
    assert not any(stops), stops
    pg.get_by_test_id("sidebar-toggle").click()
    expect(pg.get_by_test_id("session-search")).to_be_focused()  # now it takes focus
    pg.keyboard.press("Escape")
    pg.get_by_test_id("open-settings").click()
    save = pg.get_by_test_id("settings-save")
    expect(save).to_be_visible()
    box = save.bounding_box()
    assert box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"], box
    shot(pg, "phone-settings.png", docs=True)
    pg.get_by_test_id("settings-cancel").click()
    bar = pg.get_by_test_id("statusbar").bounding_box()
    assert bar["height"] < 40, bar
    small = pg.evaluate(
        """() => [...document.querySelectorAll('button, a[href], input, select, textarea')]
            .filter(e => e.offsetParent && !e.closest('#sidebar') && !e.closest('dialog'))
            .filter(e => { const r = e.getBoundingClientRect(); return r.height < 44 ||
                                                                     r.width < 44; })
            .filter(e => !['TEXTAREA', 'INPUT'].includes(e.tagName))
            .map(e => e.dataset.testid || e.id || e.tagName)"""
    )
    assert small == [], small
    context.close()


def test_importing_the_same_export_twice_gives_two_chats(
    page: Page, server: WebServer, tmp_path: Path
) -> None:
    """The sidebar's Import takes an export file; the same file again (every id taken) is
    a second copy, never a server error."""
    pg = page
    sid = server.import_session("import twice", [("Q?", "A.")])
    export = tmp_path / "export.json"
    with server.http() as http:
        export.write_bytes(http.get(f"/api/sessions/{sid}/export").content)
    pg.goto("/")
    before = len(server.request("GET", "/api/sessions")["sessions"])
    for _ in range(2):
        pg.get_by_test_id("import-file").set_input_files(str(export))
        expect(pg.get_by_test_id("toast").filter(has_text="Imported 1 conversation")).to_have_count(
            1, timeout=UI_MS
        )
        expect(pg.get_by_test_id("toast").filter(has_text="Imported")).to_have_count(
            0, timeout=UI_MS
        )
    sessions = server.request("GET", "/api/sessions")["sessions"]
    assert len(sessions) == before + 2
    # a toast never covers the message box's Send button
    pg.get_by_test_id("import-file").set_input_files(str(export))
    toast = pg.get_by_test_id("toast").first.bounding_box()
    send = pg.get_by_test_id("send").bounding_box()
    assert toast["y"] + toast["height"] <= send["y"] or toast["y"] >= send["y"] + send["height"]
    copies = [s for s in sessions if s["title"] == "import twice"]
    assert len(copies) >= 3 and len({s["id"] for s in copies}) == len(copies)
    expect(pg.get_by_test_id("toast").filter(has_text="500")).to_have_count(0)


def test_a_cut_reply_is_marked_and_continues(page: Page, server: WebServer) -> None:
    """A reply that hit max tokens says so and offers Continue, which goes on in the same
    message; Stop shows that it is stopping until the reply has ended."""
    pg = page
    sid = server.new_session(max_tokens=6)
    open_chat(pg, sid)
    pg.get_by_test_id("chat-input").fill("Tell me a story about a cat.")
    pg.get_by_test_id("chat-input").press("Enter")
    wait_replies(pg, 1)
    reply = assistant_done(pg).last
    expect(reply.get_by_test_id("length-badge")).to_have_text("cut at 6 tokens")
    before = reply.get_by_test_id("message-content").inner_text()
    reply.get_by_test_id("continue").click()
    wait_replies(pg, 1)
    reply = assistant_done(pg).last
    expect(reply.get_by_test_id("length-badge")).to_have_text("cut at 12 tokens", timeout=UI_MS)
    after = reply.get_by_test_id("message-content").inner_text()
    assert after.startswith(before.rstrip()) and len(after) > len(before)
    expect(reply.get_by_test_id("version-label")).to_have_count(0)  # no new version
    (stored,) = [
        m
        for m in server.request("GET", f"/api/sessions/{sid}")["messages"]
        if m["role"] == "assistant"
    ]
    assert stored["meta"]["completion_tokens"] == 12

    # Stop: the button says it is stopping, and no dead buttons show meanwhile
    server.request("PATCH", f"/api/sessions/{sid}", {"params": {"max_tokens": 300}})
    pg.get_by_test_id("chat-input").fill("Tell me a much longer story, please.")
    pg.get_by_test_id("chat-input").press("Enter")
    watch_growth(pg, steps=2)
    for action in ("rollback", "reply", "edit-message", "regenerate"):
        expect(pg.locator(f"[data-testid=message] [data-testid={action}]:visible")).to_have_count(0)
    stop = pg.get_by_test_id("stop")
    stop.click()
    # at once: "Stopping…" and disabled, read together (the reply may end right after)
    state = stop.evaluate("b => [b.textContent, b.disabled, b.hidden]")
    assert state in (["Stopping…", True, False], ["Stop", False, True]), state
    wait_replies(pg, 2)
    expect(assistant_done(pg).last.get_by_test_id("continue")).to_be_visible()


def test_an_interrupted_reply_stays_marked(page: Page, server: WebServer) -> None:
    """The connection drops mid-reply: the partial text stays, marked interrupted, until
    the server's saved (stopped) reply replaces it."""
    pg = page
    sid = server.new_session(max_tokens=300)
    outage = Outage(pg)
    open_chat(pg, sid)
    pg.get_by_test_id("chat-input").fill("Tell me a long story about the sea.")
    pg.get_by_test_id("chat-input").press("Enter")
    watch_growth(pg, steps=2)
    outage.sockets[-1].close()
    badge = pg.get_by_test_id("interrupted-badge")
    expect(badge).to_be_visible(timeout=UI_MS)
    partial = pg.get_by_test_id("message").last.get_by_test_id("message-content").inner_text()
    assert partial.strip()
    # reconnected: the saved reply (stopped by the closed socket) takes its place
    expect(badge).to_have_count(0, timeout=30_000)
    expect(assistant_done(pg).last).to_have_attribute("data-status", "stopped")


def test_settings_defaults_presets_and_the_visible_system_prompt(
    page: Page, server: WebServer
) -> None:
    pg = page
    pg.goto("/")
    expect(pg.get_by_test_id("status-model")).to_contain_text("SmolLM2", timeout=UI_MS)
    pg.get_by_test_id("open-settings").click()
    pg.get_by_test_id("set-system-prompt").fill("You answer like a pirate.")
    pg.get_by_test_id("set-preset").select_option("Precise")
    expect(pg.get_by_test_id("set-temperature")).to_have_value("0.2")
    pg.get_by_test_id("set-min-p").fill("0.1")
    pg.get_by_test_id("set-repetition-penalty").fill("1.1")
    pg.get_by_test_id("set-max-tokens").fill("7")
    pg.get_by_test_id("preset-name").fill("Mine")
    pg.get_by_test_id("settings-save-preset").click()
    pg.get_by_test_id("set-global").check()
    pg.get_by_test_id("settings-save").click()
    expect(pg.get_by_test_id("toast").filter(has_text="Settings saved")).to_be_visible()

    # a new chat starts from those defaults, and shows its system prompt
    pg.get_by_test_id("chat-input").fill("Hello!")
    pg.get_by_test_id("chat-input").press("Enter")
    wait_replies(pg, 1)
    sid = session_id_from_url(pg)
    stored = server.request("GET", f"/api/sessions/{sid}")
    assert stored["system_prompt"] == "You answer like a pirate."
    params = stored["params"]
    assert (params["temperature"], params["min_p"], params["max_tokens"]) == (0.2, 0.1, 7)
    assert params["repetition_penalty"] == 1.1
    expect(pg.get_by_test_id("system-prompt")).to_contain_text("You answer like a pirate.")
    # another new chat remembers them too (a reload keeps them)
    pg.get_by_test_id("new-chat").click()
    pg.reload()
    pg.get_by_test_id("open-settings").click()
    expect(pg.get_by_test_id("set-max-tokens")).to_have_value("7")
    expect(pg.get_by_test_id("set-system-prompt")).to_have_value("You answer like a pirate.")
    options = pg.get_by_test_id("set-preset").locator("option").all_inner_texts()
    assert "Mine" in options and "Creative" in options
    pg.get_by_test_id("settings-cancel").click()


def test_context_stays_current(page: Page, server: WebServer) -> None:
    """A conversation made elsewhere appears in the sidebar without a reload, and a reply
    finishing while story mode is shown leaves the story header alone."""
    pg = page
    sid = server.new_session(max_tokens=40)
    open_chat(pg, sid)
    elsewhere = server.import_session("made elsewhere", [("Hi?", "Hello.")])
    item = pg.locator(f"[data-testid=session-item][data-id='{elsewhere}']")
    expect(item).to_have_count(1, timeout=UI_MS)
    pg.get_by_test_id("chat-input").fill("Count from one to twenty.")
    pg.get_by_test_id("chat-input").press("Enter")
    expect(pg.locator("[data-testid=message][data-streaming=true]")).to_have_count(
        1, timeout=GEN_MS
    )
    pg.get_by_test_id("tab-story").click()
    expect(pg.get_by_test_id("chat-title")).to_have_text("Story mode")
    deadline = time.monotonic() + GEN_MS / 1000
    while server.request("GET", f"/api/sessions/{sid}")["message_count"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    pg.wait_for_timeout(1000)
    expect(pg.get_by_test_id("chat-title")).to_have_text("Story mode")


def test_keyboard_focus_and_announcements(page: Page, server: WebServer) -> None:
    """The skip link, shortcuts with their help, Esc on an edit keeping focus, and a
    finished reply announced politely."""
    pg = page
    sid = server.new_session(max_tokens=8)
    open_chat(pg, sid)
    pg.keyboard.press("Tab")
    expect(pg.get_by_test_id("skip-link")).to_be_focused()
    pg.keyboard.press("Enter")
    expect(pg.get_by_test_id("chat-input")).to_be_focused()
    expect(pg).to_have_url(re.compile(rf"#/c/{sid}$"))
    assert pg.locator("main").count() == 1
    pg.get_by_test_id("chat-input").fill("Say hello.")
    pg.get_by_test_id("chat-input").press("Enter")
    wait_replies(pg, 1)
    announcer = pg.get_by_test_id("announcer")
    expect(announcer).to_have_attribute("aria-live", "polite")
    expect(announcer).to_contain_text("Reply finished", timeout=UI_MS)
    # Esc on an edit returns focus to its Edit button
    user = pg.locator("[data-testid=message][data-role=user]")
    user.get_by_test_id("edit-message").click()
    expect(pg.get_by_test_id("edit-input")).to_be_focused()
    pg.keyboard.press("Escape")
    expect(user.get_by_test_id("edit-message")).to_be_focused()
    # shortcuts: the list, search, a new chat
    pg.locator("body").press("Shift+?")
    expect(pg.get_by_test_id("help-dialog")).to_be_visible()
    pg.keyboard.press("Escape")
    pg.keyboard.press("Control+k")
    expect(pg.get_by_test_id("session-search")).to_be_focused()
    pg.keyboard.press("Control+Shift+O")
    expect(pg).to_have_url(re.compile(r"#/$"))
    expect(pg.get_by_test_id("empty-chat")).to_be_visible()


AXE = REPO / "tests" / "data" / "axe" / "axe.min.js"


def axe_violations(pg: Page) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now."""
    pg.add_script_tag(path=str(AXE))
    found = pg.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
            .filter(v => ['serious', 'critical'].includes(v.impact))
            .map(v => `${v.id}: ${v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', ')}`)"""
    )
    return found


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_axe_finds_nothing_serious(browser: Browser, server: WebServer, scheme, viewport) -> None:
    """axe-core on the chat view, the settings dialog and story mode."""
    sid = server.import_session(
        "axe",
        [("Show me code.", "Here:\n\n```python\nprint('hi')\n```\n\n1. one\n2. two")],
        last_meta={
            "prompt_tokens": 20,
            "cached_tokens": 0,
            "completion_tokens": 12,
            "stop_reason": "length",
            "dropped_turns": 0,
            "ttft_ms": 50,
            "tokens_per_s": 30,
        },
    )
    # the page's CSP refuses injected scripts: only this test's context lets axe in
    context = browser.new_context(
        viewport=viewport, color_scheme=scheme, base_url=server.base, bypass_csp=True
    )
    pg = context.new_page()
    open_chat(pg, sid)
    expect(pg.locator("pre code")).to_be_visible()
    problems = {"chat": axe_violations(pg)}
    pg.get_by_test_id("open-settings").click()
    expect(pg.get_by_test_id("settings-dialog")).to_be_visible()
    problems["settings"] = axe_violations(pg)
    pg.get_by_test_id("settings-cancel").click()
    pg.goto("/#/story")
    expect(pg.get_by_test_id("story-prompt")).to_be_visible()
    problems["story"] = axe_violations(pg)
    context.close()
    assert not any(problems.values()), problems


def test_themes_phone_layout_and_screenshots(browser: Browser, server: WebServer) -> None:
    showcase = server.import_session(
        "Sorting a list in Python",
        [
            (
                "How do I sort a list of words by length?",
                "Use `sorted` with a key:\n\n```python\nwords = ['kiwi', 'fig', 'banana']\n"
                "print(sorted(words, key=len))\n```\n\nThis prints:\n\n"
                "- `['fig', 'kiwi', 'banana']`\n- shortest first; add `reverse=True` for the "
                "opposite.\n\n> Ties keep their original order: Python's sort is **stable**.",
            ),
        ],
    )
    paths = []
    for scheme in ("light", "dark"):
        context = browser.new_context(viewport=DESKTOP, color_scheme=scheme, base_url=server.base)
        pg = context.new_page()
        open_chat(pg, showcase)
        expect(pg.locator("pre code")).to_be_visible()
        # no stored choice: the theme follows the system's preference
        bg = pg.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (bg == "rgb(255, 255, 255)") == (scheme == "light"), bg
        paths.append(shot(pg, f"desktop-{scheme}.png", docs=True))
        context.close()

    # phone width: the sidebar collapses behind a toggle
    context = browser.new_context(
        viewport=PHONE, color_scheme="light", base_url=server.base, is_mobile=True, has_touch=True
    )
    pg = context.new_page()
    open_chat(pg, showcase)
    sidebar = pg.get_by_test_id("sidebar")
    toggle = pg.get_by_test_id("sidebar-toggle")
    expect(toggle).to_be_visible()
    assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 1
    paths.append(shot(pg, "phone-light.png", docs=True))
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    pg.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().x >= -1")
    paths.append(shot(pg, "phone-light-sidebar.png", docs=True))
    pg.get_by_test_id("new-chat").click()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(pg.get_by_test_id("empty-chat")).to_be_visible()

    # the toggle switches theme and the choice survives a reload
    pg.get_by_test_id("theme-toggle").click()
    assert pg.evaluate("document.documentElement.dataset.theme") == "dark"
    open_chat(pg, showcase)
    pg.reload()
    expect(pg.locator("pre code")).to_be_visible(timeout=UI_MS)
    assert pg.evaluate("localStorage.getItem('hexin.theme')") == "dark"
    bg = pg.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg != "rgb(255, 255, 255)"
    paths.append(shot(pg, "phone-dark.png", docs=True))
    pg.goto("/#/story")
    expect(pg.get_by_test_id("story-prompt")).to_be_visible()
    paths.append(shot(pg, "phone-dark-story.png", docs=True))
    context.close()
    assert len(paths) >= 4 and all(p.is_file() for p in paths)


# the contrast (WCAG) of every highlighted token on its code block's background
TOKEN_CONTRAST_JS = """(root) => {
  const rgb = (s) => s.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const lum = (c) => {
    const [r, g, b] = c.map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const spans = [...root.querySelectorAll(".code-block span[class^=hljs-]")];
  return spans.map((s) => {
    const bg = lum(rgb(getComputedStyle(s.closest(".code-block")).backgroundColor));
    const fg = lum(rgb(getComputedStyle(s).color));
    return [s.className, (Math.max(bg, fg) + 0.05) / (Math.min(bg, fg) + 0.05)];
  });
}"""


def test_markdown_lists_tables_code_math_and_reasoning(page: Page, server: WebServer) -> None:
    """A reply's markdown: ordered lists keep their numbers, GFM tables, highlighted code,
    KaTeX math (laid out under the page's CSP), a closed reasoning block; raw HTML stays
    text; the console stays free of errors (no CSP violation)."""
    pg = page
    console: list[str] = []
    pg.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    reply = (
        "<think>First, *think* about $x$.</think>\n\n"
        "4. four\n5. five\n\nAnd:\n\n"  # a paragraph between: two lists
        "2023. A good year.\n\n"
        "| name | value |\n| :--- | ---: |\n| pi | 3.14 |\n\n"
        "```python\ndef square(x):\n    return x * x  # squared\n```\n\n"
        "Inline $\\frac{a}{b}$ and `$not math$`, then\n\n"
        "$$\\int_0^1 x\\,dx$$\n\n"
        'Raw: <img src=x onerror="window.__xss = 1"> stays text.'
    )
    sid = server.import_session("markdown extras", [("Show me markdown", reply)])
    open_chat(pg, sid)
    body = pg.locator("[data-testid=message][data-role=assistant] [data-testid=message-content]")
    expect(body.locator(".math-display .katex-display")).to_be_visible(timeout=UI_MS)

    # ordered lists start where the model's numbering did
    lists = body.locator(":scope > ol")
    expect(lists).to_have_count(2)
    assert lists.nth(0).get_attribute("start") == "4"
    expect(lists.nth(0).locator("li")).to_have_text(["four", "five"])
    assert lists.nth(1).get_attribute("start") == "2023"
    expect(lists.nth(1).locator("li")).to_have_text(["A good year."])

    # a GFM table, with its column alignment
    table = body.locator("table")
    expect(table.locator("th")).to_have_text(["name", "value"])
    expect(table.locator("td")).to_have_text(["pi", "3.14"])
    assert table.locator("td").nth(1).get_attribute("align") == "right"

    # fenced python: highlighted, same text
    code = body.locator("pre code.language-python")
    expect(code).to_have_text("def square(x):\n    return x * x  # squared")
    expect(code.locator("span.hljs-keyword")).to_have_text(["def", "return"])
    expect(code.locator("span.hljs-comment")).to_have_text("# squared")
    expect(code.locator("span.hljs-title")).to_have_text("square")

    # math: inline and display KaTeX; code spans keep their dollars; `\,` reached KaTeX
    expect(body.locator(":scope > p .math-inline .katex")).to_have_count(1)
    expect(body.locator(".math-display .katex-display")).to_have_count(1)
    expect(body.locator("code:not(pre code)")).to_have_text("$not math$")
    annotation = body.locator(".math-display annotation")
    expect(annotation).to_have_text("\\int_0^1 x\\,dx")
    shown = body.evaluate(
        "(el) => { const c = el.cloneNode(true);"
        " c.querySelectorAll('code, .katex-mathml').forEach((n) => n.remove());"
        " return c.textContent; }"
    )
    assert "$" not in shown and "\\frac" not in shown and "\\int" not in shown
    # laid out: KaTeX's sizes (set through CSSOM, allowed by the CSP) and fonts took effect
    layout = body.evaluate(
        """(el) => {
          const frac = el.querySelector('.math-inline .mfrac');
          const line = frac.querySelector('.frac-line').getBoundingClientRect();
          const num = frac.querySelectorAll('.mord.mathnormal');
          const display = el.querySelector('.math-display .katex-display');
          return {
            styled: el.querySelectorAll('.katex [style]').length,
            lineWidth: line.width,
            stacked: num[0].getBoundingClientRect().top - num[1].getBoundingClientRect().top,
            displayHeight: display.getBoundingClientRect().height,
            font: getComputedStyle(el.querySelector('.katex')).fontFamily,
          };
        }"""
    )
    assert layout["styled"] > 5 and layout["lineWidth"] > 2
    assert abs(layout["stacked"]) > 5  # b below a, not side by side
    assert layout["displayHeight"] > 30
    assert "KaTeX_Main" in layout["font"]
    pg.wait_for_function("document.fonts.check('16px KaTeX_Main')", timeout=UI_MS)

    # the reasoning: a closed details block, its content markdown too
    think = body.locator("details.think")
    expect(think).to_have_count(1)
    expect(think.locator("summary")).to_have_text("Reasoning")
    assert think.get_attribute("open") is None
    expect(think.locator(".think-body em")).to_be_hidden()
    think.locator("summary").click()
    expect(think.locator(".think-body em")).to_have_text("think")
    expect(think.locator(".katex")).to_have_count(1)
    expect(body).not_to_contain_text("<think>")

    # raw HTML elsewhere is still text
    expect(body).to_contain_text('Raw: <img src=x onerror="window.__xss = 1"> stays text.')
    expect(pg.locator("[data-testid=messages] img")).to_have_count(0)
    assert pg.evaluate("window.__xss") is None

    # token colours are readable in both themes
    for theme in ("light", "dark"):
        pg.evaluate(f"document.documentElement.dataset.theme = '{theme}'")
        contrasts = body.evaluate(TOKEN_CONTRAST_JS)
        assert len(contrasts) >= 4
        low = [(cls, round(c, 2)) for cls, c in contrasts if c < 4.5]
        assert not low, f"{theme}: token contrast under 4.5:1: {low}"
    shot(pg, "markdown-extras-dark.png")

    pg.wait_for_timeout(300)
    assert not console, f"console errors: {console}"


def test_the_ui_speaks_chinese_and_switches_to_english(browser: Browser, server: WebServer) -> None:
    """A browser that prefers Chinese gets the UI in Simplified Chinese: the page's own
    text (index.html), what chat.js, the status bar and the sidebar build, and <html lang>.
    The language select in the settings dialog switches to English at once (no reload),
    and the choice survives a reload. A browser with no Chinese preference gets English."""
    meta = {
        "prompt_tokens": 7000,
        "cached_tokens": 6000,
        "completion_tokens": 500,
        "stop_reason": "length",
        "dropped_turns": 1,
        "ttft_ms": 40,
        "tokens_per_s": 25,
    }
    sid = server.import_session(
        "语言测试", [("你好？", "你好！"), ("还有呢？", "一段被截断的")], meta
    )
    errors: list[str] = []

    def new_page(**options: Any) -> Page:
        context = browser.new_context(
            viewport=DESKTOP, color_scheme="light", base_url=server.base, **options
        )
        pg = context.new_page()
        pg.on("pageerror", lambda e: errors.append(str(e)))
        open_chat(pg, sid)
        return pg

    pg = new_page(locale="zh-CN")
    assert pg.evaluate("document.documentElement.lang") == "zh-CN"
    # both tables have the same keys: nothing falls back to English by accident
    only = pg.evaluate(
        """async () => {
          const m = await import(new URL('js/i18n.js', document.baseURI).href);
          const en = m.keys('en'), zh = m.keys('zh-CN');
          return [en.filter(k => !zh.includes(k)), zh.filter(k => !en.includes(k))];
        }"""
    )
    assert only == [[], []], only
    reply = assistant_done(pg).last
    user = pg.locator("[data-testid=message][data-role=user]").last
    bar = pg.get_by_test_id("session-item").filter(has_text="语言测试")
    chinese = {
        # index.html
        pg.get_by_test_id("send"): "发送",
        pg.get_by_test_id("new-chat"): "+ 新对话",
        pg.get_by_test_id("tab-chat"): "聊天",
        pg.get_by_test_id("export-all"): "导出全部",
        pg.get_by_test_id("open-help"): "快捷键",
        # chat.js
        reply.locator(".msg-role"): "助手",
        user.locator(".msg-role"): "你",
        reply.get_by_test_id("length-badge"): "在 500 个 token 处截断",
        reply.get_by_test_id("regenerate"): "重新生成",
        reply.get_by_test_id("rollback"): "回滚",
        reply.get_by_test_id("copy-message"): "复制",
        user.get_by_test_id("edit-message"): "编辑",
        # status.js
        pg.get_by_test_id("connection"): "已连接",
        pg.get_by_test_id("status-dropped"): "为适应上下文，省略了 1 轮较早的对话",
        pg.get_by_test_id("status-speed"): "25.0 token/秒",
        pg.get_by_test_id("status-cached"): "缓存 6,000",
    }
    for locator, text in chinese.items():
        expect(locator).to_have_text(text, timeout=UI_MS)
    # no English left: among the texts above, nor the sidebar's and the attributes
    shown = [locator.inner_text() for locator in chinese]
    shown += [
        bar.locator(".session-when").inner_text(),
        bar.get_by_test_id("session-delete").get_attribute("aria-label"),
        bar.get_by_test_id("session-rename").get_attribute("title"),
        pg.get_by_test_id("session-search").get_attribute("placeholder"),
        pg.get_by_test_id("chat-input").get_attribute("placeholder"),
        pg.get_by_test_id("theme-toggle").get_attribute("aria-label"),
    ]
    english = [s for s in shown if re.search(r"[a-z]{2,}", s.lower().replace("token", ""))]
    assert not english, english
    assert bar.get_by_test_id("session-delete").get_attribute("aria-label") == "删除“语言测试”"

    # the settings dialog: Chinese, and the language select switches at once
    pg.get_by_test_id("open-settings").click()
    dialog = pg.get_by_test_id("settings-dialog")
    expect(dialog.locator("h2")).to_have_text("设置")
    expect(pg.get_by_test_id("settings-save")).to_have_text("保存")
    select = pg.get_by_test_id("set-language")
    expect(select).to_have_value("zh-CN")
    expect(pg.get_by_label("语言", exact=True)).to_be_visible()
    select.select_option("en")
    expect(dialog.locator("h2")).to_have_text("Settings")
    expect(pg.get_by_test_id("settings-cancel")).to_have_text("Cancel")
    expect(pg.locator("#settings-scope")).to_have_text(
        "For this conversation; saved on the server."
    )
    pg.get_by_test_id("settings-cancel").click()
    english_texts = {
        pg.get_by_test_id("send"): "Send",
        pg.get_by_test_id("new-chat"): "+ New chat",
        pg.get_by_test_id("tab-chat"): "Chat",
        reply.locator(".msg-role"): "Assistant",
        reply.get_by_test_id("length-badge"): "cut at 500 tokens",
        reply.get_by_test_id("regenerate"): "Regenerate",
        pg.get_by_test_id("connection"): "connected",
        pg.get_by_test_id("status-dropped"): "1 older turn left out to fit the context",
        pg.get_by_test_id("status-speed"): "25.0 tok/s",
    }
    for locator, text in english_texts.items():
        expect(locator).to_have_text(text)
    expect(bar.get_by_test_id("session-rename")).to_have_attribute("title", "Rename")
    assert pg.evaluate("document.documentElement.lang") == "en"
    assert pg.evaluate("localStorage.getItem('hexin.lang')") == "en"
    # the choice is kept: a reload stays English, though the browser prefers Chinese
    pg.reload()
    expect(pg.get_by_test_id("connection")).to_have_text("connected", timeout=UI_MS)
    expect(pg.get_by_test_id("send")).to_have_text("Send")
    expect(assistant_done(pg).last.get_by_test_id("length-badge")).to_have_text("cut at 500 tokens")
    assert pg.evaluate("document.documentElement.lang") == "en"
    pg.context.close()

    # a browser with the default (English) locale: English, with nothing stored
    pg = new_page()
    assert pg.evaluate("localStorage.getItem('hexin.lang')") is None
    assert pg.evaluate("document.documentElement.lang") == "en"
    expect(pg.get_by_test_id("new-chat")).to_have_text("+ New chat")
    expect(pg.get_by_test_id("send")).to_have_text("Send")
    expect(assistant_done(pg).last.get_by_test_id("length-badge")).to_have_text("cut at 500 tokens")
    expect(pg.get_by_test_id("open-help")).to_have_text("Shortcuts")
    pg.context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def test_a_dropped_text_file_is_attached_to_the_message(page: Page, server: WebServer) -> None:
    pg = page
    sid = server.new_session(max_tokens=4)
    open_chat(pg, sid)
    pg.evaluate(
        """() => {
            const data = new DataTransfer();
            data.items.add(new File(["a,b\\n1,2\\n"], "table.csv", { type: "text/csv" }));
            const form = document.querySelector("#composer");
            const init = { dataTransfer: data, bubbles: true, cancelable: true };
            form.dispatchEvent(new DragEvent("dragover", init));
            form.dispatchEvent(new DragEvent("drop", init));
        }"""
    )
    expect(pg.get_by_test_id("attachment")).to_have_text(re.compile("table.csv"))
    pg.get_by_test_id("chat-input").fill("What is in this file?")
    pg.get_by_test_id("chat-input").press("Enter")
    wait_replies(pg, 1)
    expect(pg.get_by_test_id("attachment")).to_have_count(0)
    user = server.request("GET", f"/api/sessions/{sid}")["path"][0]
    assert user["content"] == "table.csv:\n```\na,b\n1,2\n```\n\nWhat is in this file?"
