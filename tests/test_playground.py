"""`GET /playground` in a real headless Chromium against the Serve app on 127.0.0.1.

What a person sees must be what the API says: the cards' order, `data-index` and `data-score` (the score's
exact text in the API's JSON) equal a plain `/v2/rerank` answer to the same request; evidence arrives on
the cards; an error shows the server's own message; the page works under a route prefix with an API key.
The browser is Debian's `chromium`, installed with apt when missing (as the README's set-up does); the
module is skipped only when no browser can be had. A screenshot lands in out/artifacts/.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from browser import Browser, find_or_install_chromium
from conftest import english_texts, free_port, serve_tier

pytestmark = pytest.mark.cluster  # starts a Ray cluster

ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "artifacts"
QUERY = "What is the boiling point of water at sea level?"
DOCS = ["Water boils at 100 degrees Celsius (212 °F) at sea level; higher up it boils at a lower temperature.",
        *english_texts(5, 12, 40)]
KEY = "playground-key"




@pytest.fixture(scope="module")
def chromium():
    binary, why = find_or_install_chromium()
    if binary is None:
        pytest.skip(f"no headless browser for the playground test: {why}")
    return binary


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(num_cpus=8, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tiny = {"name": "prism-tiny", "model": str(tiny_ckpt), "size": "0.8b", "dtype": "float32", "max_length": 512}
    serve.run(build_app({"models": [{**tiny, "scorer": serve_tier(), "evidence": serve_tier(max_active_pairs=4)}],
                         "limits": {"max_new_tokens": 64}}), name="prism", route_prefix="/")
    serve.run(build_app({"models": [{**tiny, "scorer": serve_tier(), "evidence": None}], "api_keys": [KEY]}),
              name="guarded", route_prefix="/guarded")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def browser(chromium, server, tmp_path_factory):
    b = Browser(chromium, tmp_path_factory.mktemp("chromium"))
    yield b
    b.close()


# -- reading the page -------------------------------------------------------------------------------------

class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children = tag, attrs, []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, pred) -> list[Node]:
        out = []
        for c in self.children:
            if isinstance(c, Node):
                if pred(c):
                    out.append(c)
                out.extend(c.find_all(pred))
        return out

    def find(self, pred) -> Node | None:
        found = self.find_all(pred)
        return found[0] if found else None


class _Tree(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    tree = _Tree()
    tree.feed(html)
    return tree.root


def by_class(name: str):
    return lambda n: name in n.classes


def cards(page: Node) -> list[Node]:
    return page.find_all(lambda n: n.tag == "li" and "card" in n.classes)


def pre_text(node: Node) -> str:
    """A <pre>'s text as a browser reads it: serializing adds a line feed before one that starts the text,
    and parsing drops it."""
    text = node.text()
    return text[1:] if text.startswith("\n") else text


def playground_url(server: str, prefix: str = "", key: str | None = None, **params) -> str:
    pairs = [(k, v) for k, v in params.items() if k != "docs"] + [("doc", d) for d in params.get("docs", [])]
    return f"{server}{prefix}/playground?{urlencode(pairs)}" + (f"#{urlencode({'key': key})}" if key else "")


def api_answer(server: str, body: dict, prefix: str = "", headers: dict | None = None) -> list[dict]:
    """The API's own answer, every score kept as the exact text of its JSON number."""
    resp = httpx.post(f"{server}{prefix}/v2/rerank", json=body, headers=headers or {}, timeout=120)
    assert resp.status_code == 200, resp.text
    return json.loads(resp.text, parse_float=str)["results"]


# -- the tests ----------------------------------------------------------------------------------------------

def test_page_is_self_contained_public_and_documented(server):
    """The page loads nothing from elsewhere (its CSP would block it), is served without a key even
    where keys are on (it asks for one itself), and is in each app's OpenAPI document as text/html."""
    resp = httpx.get(f"{server}/playground")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    html = resp.text
    for external in ("http://", "https://", "src=", "<link", "@import", "url("):
        assert external not in html, external
    guarded = httpx.get(f"{server}/guarded/playground")
    assert guarded.status_code == 200 and guarded.text == html
    spec = httpx.get(f"{server}/openapi.json").json()["paths"]["/playground"]["get"]
    assert set(spec["responses"]) == {"200"} and "text/html" in spec["responses"]["200"]["content"]
    guarded_spec = httpx.get(f"{server}/guarded/openapi.json").json()["paths"]
    assert guarded_spec["/playground"]["get"]["security"] == [] and "401" not in guarded_spec["/playground"]["get"]["responses"]
    assert guarded_spec["/v1/models"]["get"]["security"] == [{"bearer": []}]


def test_ranking_on_the_page_equals_the_api(server, browser):
    """URL parameters fill the form and run it; each card, in rank order, carries the API's index and
    the exact score text of the API's JSON; the shown number is that score rounded."""
    browser.open(playground_url(server, model="prism-tiny", query=QUERY, docs=DOCS, top_n=4, run=1))
    page = parse(browser.html())
    assert page.find(lambda n: n.tag == "body").attrs["data-state"] == "done"
    expected = api_answer(server, {"model": "prism-tiny", "query": QUERY, "documents": DOCS, "top_n": 4})
    shown = cards(page)
    assert [(c.attrs["data-index"], c.attrs["data-score"]) for c in shown] == \
        [(str(r["index"]), r["relevance_score"]) for r in expected]
    for c, r in zip(shown, expected):
        assert abs(float(c.find(by_class("score")).text()) - float(r["relevance_score"])) <= 5e-5
        assert c.find(by_class("text")).text() == DOCS[r["index"]]
    assert not page.find(lambda n: n.attrs.get("id") == "error").text()
    # the form holds what the URL said, so a person can edit and re-run it
    assert browser.evaluate("[...document.querySelectorAll('#docs textarea')].map(t => t.value)") == DOCS
    assert browser.evaluate("document.getElementById('model').value") == "prism-tiny"


def test_a_long_document_shows_its_best_chunk(server, browser):
    """With `max_chunks`, the page asks for chunking and marks the span of each document's best chunk: the
    marked text is `document[start:end]` of the API's `chunk`."""
    long_doc = " ".join(DOCS) * 6
    docs = [long_doc, DOCS[0]]
    browser.open(playground_url(server, model="prism-tiny", query=QUERY, docs=docs, max_chunks=4, run=1))
    page = parse(browser.html())
    assert page.find(lambda n: n.tag == "body").attrs["data-state"] == "done"
    expected = json.loads(httpx.post(f"{server}/v2/rerank", json={
        "model": "prism-tiny", "query": QUERY, "documents": docs, "chunking": {"max_chunks_per_doc": 4}},
        timeout=120).text, parse_float=str)["results"]
    shown = cards(page)
    assert [(c.attrs["data-index"], c.attrs["data-score"]) for c in shown] == \
        [(str(r["index"]), r["relevance_score"]) for r in expected]
    for c, r in zip(shown, expected):
        span = r["chunk"]
        mark = c.find(lambda n: n.tag == "mark")
        assert mark is not None and mark.text() == docs[r["index"]][span["start"]:span["end"]]
    assert next(r for r in expected if r["index"] == 0)["chunk"]["count"] > 1


def test_evidence_arrives_on_the_cards(server, browser):
    """With evidence=1 each of the top cards shows its text growing (evidence_delta events), then gets its own
    evidence event's text, the same text the API generates for that document; the rest get none. Saves the
    screenshot."""
    browser.open(playground_url(server, query=QUERY, docs=DOCS, evidence=1, evidence_top_n=2, max_new_tokens=24, run=1))
    page = parse(browser.html())
    assert page.find(lambda n: n.tag == "body").attrs["data-state"] == "done"
    shot = browser.screenshot(ARTIFACTS / "playground.png")
    expected = api_answer(server, {"query": QUERY, "documents": DOCS, "evidence": {"top_n": 2, "max_new_tokens": 24}})
    shown = cards(page)
    assert [(c.attrs["data-index"], c.attrs["data-score"]) for c in shown] == \
        [(str(r["index"]), r["relevance_score"]) for r in expected]
    for c, r in zip(shown, expected):
        if "generated_text" not in r:
            assert "data-evidence" not in c.attrs and not c.find(lambda n: n.tag == "pre")
            continue
        assert c.attrs["data-evidence"] == "done"
        assert int(c.attrs["data-deltas"]) >= 2  # the text grew on the card, delta by delta, before it ended
        assert not c.find(by_class("generating"))  # and the live text gave way to the finished fields
        assert pre_text(c.find(lambda n: n.tag == "pre")) == r["generated_text"]
        for field in ("contribution", "evidence"):  # shown only when the model wrote one (null otherwise)
            box = c.find(by_class(field))
            assert ("".join(x for x in box.children if isinstance(x, str)) if box else None) == r[field]
    assert sum("generated_text" in r for r in expected) == 2
    assert "evidence for 2 document(s)" in page.find(lambda n: n.attrs.get("id") == "status").text()
    assert shot.stat().st_size > 10_000


def test_a_refused_request_shows_the_server_message(server, browser):
    """An unknown model: the page shows the 404 body's message and type, and no cards."""
    browser.open(playground_url(server, model="13b", query=QUERY, docs=DOCS[:2], run=1))
    page = parse(browser.html())
    refused = httpx.post(f"{server}/v2/rerank", json={"model": "13b", "query": QUERY, "documents": DOCS[:2]})
    assert refused.status_code == 404
    box = page.find(lambda n: n.attrs.get("id") == "error")
    assert page.find(lambda n: n.tag == "body").attrs["data-state"] == "error" and "hidden" not in box.attrs
    assert box.find(by_class("message")).text() == refused.json()["message"]
    assert "unknown_model" in box.find(by_class("kind")).text() and "404" in box.find(by_class("kind")).text()
    assert cards(page) == []


def test_under_a_route_prefix_with_an_api_key(server, browser):
    """From /guarded/playground the page calls /guarded/v1/models and /guarded/v2/rerank (relative URLs)
    and sends the key as a bearer token; without a key it shows the 401 message."""
    headers = {"Authorization": f"Bearer {KEY}"}
    browser.open(playground_url(server, "/guarded", key=KEY, query=QUERY, docs=DOCS[:3], run=1))
    page = parse(browser.html())
    assert page.find(lambda n: n.tag == "body").attrs["data-state"] == "done"
    expected = api_answer(server, {"query": QUERY, "documents": DOCS[:3]}, "/guarded", headers)
    assert [(c.attrs["data-index"], c.attrs["data-score"]) for c in cards(page)] == \
        [(str(r["index"]), r["relevance_score"]) for r in expected]
    assert [o.attrs["value"] for o in page.find_all(lambda n: n.tag == "option")] == ["prism-tiny"]

    browser.open(playground_url(server, "/guarded", query=QUERY, docs=DOCS[:2], run=1))
    page = parse(browser.html())
    unauthorized = httpx.post(f"{server}/guarded/v2/rerank", json={"query": QUERY, "documents": DOCS[:2]})
    assert unauthorized.status_code == 401
    assert page.find(by_class("message")).text() == unauthorized.json()["message"]


def test_renderers_for_what_test_checkpoints_never_produce(server, browser):
    """Two things a random-weight checkpoint cannot show end to end, checked on the page's own renderers:
    a result's `chunk` span (a coming feature) is marked in the document, and a parsed contribution and
    evidence get their boxes. Text stays text (no HTML injection from documents or model output)."""
    browser.open(f"{server}/playground", until="document.getElementById('model').options.length > 0")
    html = browser.evaluate("docText('<b>water</b> boils at 100 C', {start: 3, end: 8}).innerHTML")
    assert html == "&lt;b&gt;<mark>water</mark>&lt;/b&gt; boils at 100 C"
    assert browser.evaluate("docText('plain', undefined).innerHTML") == "plain"
    browser.evaluate("""state.documents = ['doc zero', 'doc one'];
        renderScores([{index: 1, relevance_score: 0.9, rawScore: '0.9'}, {index: 0, relevance_score: 0.1, rawScore: '0.1'}], 1);
        renderEvidence({index: 1, contribution: 'It <i>answers</i>.', evidence: 'Water boils at 100 C.',
                        evidence_truncated: false, generated_text: 'yes ...'})""")
    page = parse(browser.html())
    first, second = cards(page)
    assert (first.attrs["data-index"], first.attrs["data-evidence"]) == ("1", "done") and "data-evidence" not in second.attrs
    assert first.find(by_class("contribution")).text() == "contributionIt <i>answers</i>."
    assert first.find(by_class("evidence")).text() == "evidenceWater boils at 100 C."
    assert not first.find(by_class("pending"))


@pytest.mark.parametrize("app", ["", "/guarded"], ids=["open", "with-keys"])
def test_openapi_contract_of_the_page(server, tmp_path, app):
    """`schemathesis run --checks all` on the /playground operation alone (test_serve's contract test
    covers the whole app): its documented statuses and content type hold, with and without keys
    configured (where it must not answer 401: it is declared public)."""
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).with_name("schemathesis")),
           "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
           "run", f"{server}{app}/openapi.json", "--include-path", "/playground", "--checks", "all",
           "--max-examples", "10", "--seed", "7", "--workers", "1", "--generation-database", "none", "--no-color"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Tested: 1" in proc.stdout and "No issues found" in proc.stdout, proc.stdout[-4000:]
