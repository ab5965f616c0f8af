"""The labeling page in real headless Chromium (Debian's chromium + chromedriver via Selenium):
log in with a token, rank by keyboard and by drag, set Likert scores and flags, submit, reload;
the export holds exactly those labels; a `<script>` completion renders as text. Plus the
HTTP-level guards: a wrong token is 401, a POST without the CSRF token is refused."""

import json

import pytest
import requests

from feedback_support import Labeler, chromium_or_skip, label_server, quit_browser, wait_for
from tidal.feedback.store import FeedbackStore, NewTask, TaskResponse

XSS = "<script>window.__pwned = 1</script><b>bold?</b> & <img src=x onerror=\"window.__pwned=2\">"
TASKS = [
    NewTask("Greet the user warmly.", [TaskResponse("Hello! Lovely to see you.", "policy", "7"),
                                       TaskResponse(XSS, "policy", "7"), TaskResponse("hi", "sft", "0")]),
    NewTask("Say something kind.", [TaskResponse("You did great today.", "policy", "7"), TaskResponse("No.", "sft", "0")]),
]


@pytest.fixture
def served(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True)
    store.add_tasks(TASKS, overlap_fraction=0.0)
    tokens = {"ann": store.add_labeler("ann"), "boss": store.add_labeler("boss", admin=True)}
    with label_server(tmp_path / "fb") as (url, _):
        yield url, tokens, store


def order(driver) -> list[str]:
    from selenium.webdriver.common.by import By
    return [li.find_element(By.CSS_SELECTOR, ".text").text for li in driver.find_elements(By.CSS_SELECTOR, "#responses > li")]


def test_label_in_the_browser_and_export(served):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, tokens, store = served
    driver = chromium_or_skip()
    try:
        driver.get(url + "/label")  # not logged in: sent to the login form
        wait_for(lambda: driver.current_url.endswith("/login"), what="redirect to /login")
        driver.find_element(By.ID, "token").send_keys("not-a-token")
        driver.find_element(By.ID, "login").click()
        wait_for(lambda: "not valid" in driver.find_element(By.ID, "error").text, what="the wrong-token message")
        driver.find_element(By.ID, "token").send_keys(tokens["ann"])
        driver.find_element(By.ID, "login").click()
        wait_for(lambda: driver.execute_script("return document.body.dataset.ready") == "1", what="the label page")
        assert driver.find_element(By.ID, "prompt").text == "Greet the user warmly."
        assert "Labeled 0" in driver.find_element(By.ID, "progress").text

        # the <script> completion is text: shown verbatim, nothing ran, no element was made
        assert XSS in order(driver)
        assert driver.execute_script("return window.__pwned") is None
        assert driver.find_elements(By.CSS_SELECTOR, "#responses b, #responses img, #responses script") == []

        # keyboard: focus the last response, move it to the top, score it 6 with the digit key
        items = driver.find_elements(By.CSS_SELECTOR, "#responses > li")
        last_text = order(driver)[-1]
        driver.execute_script("arguments[0].focus()", items[-1])
        items[-1].send_keys(Keys.ARROW_UP, Keys.ARROW_UP, "6")
        assert order(driver)[0] == last_text
        # drag: the response now third goes to the top, by its handle, with the mouse
        third = driver.find_elements(By.CSS_SELECTOR, "#responses > li")[2]
        dragged_text = order(driver)[2]
        first = driver.find_elements(By.CSS_SELECTOR, "#responses > li")[0]
        ActionChains(driver).click_and_hold(third.find_element(By.CSS_SELECTOR, ".handle")) \
            .move_to_element_with_offset(first, 0, -first.size["height"] // 2 + 3).pause(0.2).release().perform()
        want_order = order(driver)
        assert want_order[0] == dragged_text and want_order[1] == last_text
        # Likert by clicking for the other two, flags on the XSS one
        items = driver.find_elements(By.CSS_SELECTOR, "#responses > li")
        scores = {}
        for li, score in zip(items, (2, None, 5)):
            text = li.find_element(By.CSS_SELECTOR, ".text").text
            if score is not None:
                li.find_element(By.CSS_SELECTOR, f".likert button[value='{score}']").click()
            scores[text] = score if score is not None else 6
        xss_li = next(li for li in items if li.find_element(By.CSS_SELECTOR, ".text").text == XSS)
        for flag in ("harmful or toxic", "made-up facts"):
            xss_li.find_element(By.CSS_SELECTOR, f".flags input[value='{flag}']").click()
        driver.find_element(By.ID, "comment").send_keys("the second one is code")
        driver.find_element(By.ID, "submit").click()
        # ranked first with score 2, second with 6: a warning, not a block; a second press sends
        wait_for(lambda: "lower score (2)" in driver.find_element(By.ID, "warning").text, what="the contradiction warning")
        assert driver.find_element(By.ID, "prompt").text == "Greet the user warmly." and store.labels() == []
        driver.find_element(By.ID, "submit").click()
        wait_for(lambda: driver.find_element(By.ID, "prompt").text == "Say something kind.", what="the next task")
        assert "Labeled 1" in driver.find_element(By.ID, "progress").text

        driver.refresh()  # the first task is not shown again; the second one is still ours
        wait_for(lambda: driver.execute_script("return document.body.dataset.ready") == "1", what="reload")
        assert driver.find_element(By.ID, "prompt").text == "Say something kind."
        assert "Labeled 1" in driver.find_element(By.ID, "progress").text
        driver.set_window_size(375, 800)  # phone width: nothing wider than the screen
        wait_for(lambda: driver.execute_script("return window.innerWidth") <= 400, what="the narrow window")
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")

        # the researcher page, as the admin: counts, Likert histogram and flags of that label
        driver.set_window_size(900, 1200)
        driver.delete_all_cookies()
        driver.get(url + "/login")
        driver.find_element(By.ID, "token").send_keys(tokens["boss"])
        driver.find_element(By.ID, "login").click()
        wait_for(lambda: driver.current_url.endswith("/admin")
                 and driver.execute_script("return document.body.dataset.ready") == "1", what="the researcher page")
        cells = lambda table: [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]  # noqa: E731
                               for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table} tr")][1:]
        assert ["ann", "1", "0"] == cells("labelers")[0][:3]
        assert cells("queue")[0][:4] == ["2", "0", "1", "1"]
        assert {score: n for score, n in cells("likert")} == {"1": "0", "2": "1", "3": "0", "4": "0", "5": "1", "6": "1", "7": "0"}
        assert dict(cells("flags"))["harmful or toxic"] == "1"
        assert len(driver.find_elements(By.CSS_SELECTOR, "a[href='/export/rankings']")) == 1
    finally:
        quit_browser(driver)

    admin = Labeler(url, tokens["boss"])
    rankings = [json.loads(x) for x in admin.http.get(url + "/export/rankings", timeout=10).text.splitlines()]
    assert len(rankings) == 1
    row = rankings[0]
    assert row["prompt"] == "Greet the user warmly." and row["labeler"] == "ann"
    assert [row["responses"][row["ranking"].index(r)] for r in range(3)] == want_order
    ratings = {r["response"]: r for r in (json.loads(x) for x in admin.http.get(url + "/export/ratings", timeout=10).text.splitlines())}
    assert {t: r["likert"] for t, r in ratings.items()} == scores
    assert {t: sorted(r["flags"]) for t, r in ratings.items()} == {
        XSS: ["harmful or toxic", "made-up facts"], "hi": [], "Hello! Lovely to see you.": []}
    assert ratings["hi"]["source"] == "sft" and ratings[XSS]["comment"] == "the second one is code"
    assert len(store.labels()) == 1


def test_wrong_token_is_401_and_csrf_is_required(served):
    url, tokens, store = served
    assert Labeler(url, "wrong-token").login_status == 401
    ann = Labeler(url, tokens["ann"])
    assert ann.login_status == 303
    task = ann.next()
    body = {"submission_id": "sub-00000001", "task_id": task["id"], "order": [0, 1, 2], "likert": [4, 4, 4], "flags": [[], [], []]}
    r = ann.submit(body, csrf=False)
    assert r.status_code == 403 and "CSRF" in r.json()["error"]
    bad = ann.http.post(url + "/api/submit", json=body, headers={"X-CSRF-Token": "forged"}, timeout=10)
    assert bad.status_code == 403
    # the login form itself needs its CSRF cookie + field pair
    fresh = requests.post(url + "/login", data={"token": tokens["ann"]}, allow_redirects=False, timeout=10)
    assert fresh.status_code == 403
    # the API without a session is 401; the researcher API is admin-only
    assert requests.get(url + "/api/next", timeout=10).status_code == 401
    assert ann.http.get(url + "/api/stats", timeout=10).status_code == 403
    assert ann.http.get(url + "/export/rankings", timeout=10).status_code == 403
    assert store.labels() == []
    for broken, field in (({**body, "order": [0, 0, 1]}, "'order'"), ({**body, "likert": [9, 4, 4]}, "'likert'"),
                          ({**body, "submission_id": None}, "'submission_id'"), ({**body, "task_id": "1"}, "'task_id'")):
        r = ann.submit(broken)
        assert r.status_code == 400 and field in r.json()["error"], r.text
    assert ann.http.post(url + "/api/submit", data=b"{not json", headers={"X-CSRF-Token": ann.csrf}, timeout=10).status_code == 400
    ok = ann.submit(body)
    assert ok.status_code == 200 and len(store.labels()) == 1
    # over the request-size limit: 413
    big = ann.submit({**body, "comment": "x" * 300_000})
    assert big.status_code == 413
    # a cookie-less page gets the security headers that forbid inline script
    csp = requests.get(url + "/login", timeout=10).headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
