"""The labeling page's working features in real headless Chromium through `tidal label serve`:
Submit in view at 1200x900; page-wide keys and their `?` legend; ties; the warning for an
untouched order; editing the last label (history kept) and the session's progress; the
researcher's guidelines rendered as safe Markdown; Likert scores off; the researcher page's
paginated task list and a task's labels."""

import pytest

from feedback_support import Labeler, chromium_or_skip, label_server, quit_browser, wait_for
from tidal.feedback import export
from tidal.feedback.store import FeedbackStore, NewTask, Settings, TaskResponse

SHORT = ["Sorry it was late; the shipping is refunded.", "Parcels are late sometimes.",
         "Sorry about the delay, your next delivery ships free.", "ok"]


def _task(prompt: str, texts) -> NewTask:
    return NewTask(prompt, [TaskResponse(t, "m", "1") for t in texts])


@pytest.fixture
def folder(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True, settings=Settings(overlap_fraction=0.0))
    store.add_tasks([_task("Reply to a customer whose parcel came late.", SHORT), _task("Say hi.", ["hi", "hello", "hey"]),
                     _task("Say bye.", ["bye", "ciao"])])
    return store


@pytest.fixture
def browser():
    driver = chromium_or_skip()
    yield driver
    quit_browser(driver)


def open_page(driver, url, token, size=(1200, 900)):
    from selenium.webdriver.common.by import By

    driver.set_window_size(*size)
    driver.get(url + "/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    wait_for(lambda: driver.execute_script("return document.body.dataset.ready") == "1", what="the page")


def keys(driver, *sequence):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*sequence).perform()


def texts(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('#responses > li .text'), e => e.textContent)")


def focused_text(driver) -> str | None:
    return driver.execute_script("const a = document.activeElement; const t = a && a.querySelector && a.querySelector('.text');"
                                 " return t ? t.textContent : null")


def ranks_by_text(label, task) -> dict[str, int]:
    return {r.text: label.ranking[i] for i, r in enumerate(task.responses)}


def test_submit_is_in_view_at_1200x900(folder, browser):
    from selenium.webdriver.common.by import By

    folder.configure(guidelines="# Guidelines\n\nRank by **helpfulness**.\n\n- honest first\n- then polite\n")
    with label_server(folder.folder) as (url, _):
        open_page(browser, url, folder.add_labeler("ann"))
        assert len(texts(browser)) == 4 and browser.find_element(By.ID, "guidelines-panel").is_displayed()
        for panel in ("with the guidelines beside it", "without"):
            box = browser.execute_script("const r = document.getElementById('submit').getBoundingClientRect();"
                                         " return [r.top, r.bottom, window.innerHeight, window.scrollY]")
            assert box[3] == 0 and 0 <= box[0] and box[1] <= box[2], (panel, box)
            keys(browser, "g")  # hide the guidelines: the list gets wider


def test_keys_legend_ties_and_skip(folder, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    with label_server(folder.folder) as (url, _):
        open_page(browser, url, folder.add_labeler("ann"))
        legend = browser.find_element(By.ID, "keys")
        assert not legend.is_displayed()
        keys(browser, "?")
        assert legend.is_displayed() and "submit the ranking" in legend.text and "Ctrl + Enter" in legend.text
        keys(browser, "?")
        assert not legend.is_displayed()
        shown = texts(browser)
        keys(browser, "j")
        assert focused_text(browser) == shown[0]
        keys(browser, "j", "j", "k")
        assert focused_text(browser) == shown[1]
        keys(browser, "k", "7", "j", "=", "7", "j", "4", "j", "1")  # 1st 7, 2nd tied with it 7, 3rd 4, 4th 1
        assert browser.find_elements(By.CSS_SELECTOR, "#responses > li .rank")[1].text == "=1"
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(browser).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
        wait_for(lambda: browser.find_element(By.ID, "prompt").text == "Say hi.", what="the next task")
        (label,) = folder.labels()
        task = folder.tasks()[label.task_id]
        assert ranks_by_text(label, task) == {shown[0]: 0, shown[1]: 0, shown[2]: 2, shown[3]: 3}
        assert export.ranking_rows(folder)[0]["ranking"] == label.ranking  # the tie is kept
        assert len(export.comparison_rows(folder)) == 5  # C(4, 2) less the tied pair

        keys(browser, "s")  # skip by keyboard: the reason list takes the focus, Enter skips
        assert browser.find_element(By.ID, "skip-box").get_attribute("open") is not None
        assert browser.switch_to.active_element.get_attribute("id") == "skip-reason"
        Select(browser.find_element(By.ID, "skip-reason")).select_by_visible_text("I cannot judge this topic")
        browser.find_element(By.ID, "skip-reason").send_keys(Keys.ENTER)
        wait_for(lambda: browser.find_element(By.ID, "prompt").text == "Say bye.", what="the task after the skip")
        assert folder.labels()[-1].skip_reason == "I cannot judge this topic"


def test_untouched_order_warns_then_an_edit_keeps_the_history(folder, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with label_server(folder.folder) as (url, _):
        open_page(browser, url, folder.add_labeler("ann"))
        shown = texts(browser)
        for li, score in zip(browser.find_elements(By.CSS_SELECTOR, "#responses > li"), (7, 5, 3, 1)):
            li.find_element(By.CSS_SELECTOR, f".likert button[value='{score}']").click()
        browser.find_element(By.ID, "submit").click()
        wait_for(lambda: "kept the order the responses came in" in browser.find_element(By.ID, "warning").text,
                 what="the untouched-order warning")
        assert folder.labels() == []
        browser.find_element(By.ID, "submit").click()  # the labeler means it
        wait_for(lambda: browser.find_element(By.ID, "prompt").text == "Say hi.", what="the next task")
        assert "This session: 1 label" in browser.find_element(By.ID, "session-progress").text
        assert " s per label" in browser.find_element(By.ID, "session-progress").text

        keys(browser, "u")  # edit it: the same task, as it was sent
        wait_for(lambda: browser.find_element(By.ID, "editing").is_displayed(), what="the edit banner")
        assert texts(browser) == shown and browser.find_element(By.ID, "prompt").text.startswith("Reply to a customer")
        pressed = browser.find_elements(By.CSS_SELECTOR, "#responses > li .likert button[aria-pressed='true']")
        assert [b.text for b in pressed] == ["7", "5", "3", "1"]
        items = browser.find_elements(By.CSS_SELECTOR, "#responses > li")
        browser.execute_script("arguments[0].focus()", items[-1])
        items[-1].send_keys(Keys.ARROW_UP, Keys.ARROW_UP, Keys.ARROW_UP, "7")  # the last one is the best after all
        browser.find_element(By.ID, "submit").click()
        wait_for(lambda: browser.find_element(By.ID, "prompt").text == "Say hi.", what="back to the next task")
        assert not browser.find_element(By.ID, "editing").is_displayed()
        assert "This session: 1 label" in browser.find_element(By.ID, "session-progress").text  # an edit is no new label
    first, second = folder.labels(history=True)
    assert first.superseded_at is not None and second.replaces == first.id and second.superseded_at is None
    task = folder.tasks()[first.task_id]
    assert ranks_by_text(first, task)[shown[3]] == 3 and ranks_by_text(second, task)[shown[3]] == 0
    assert [lab.id for lab in folder.labels()] == [second.id]


def test_guidelines_are_safe_markdown_and_likert_can_be_off(folder, browser):
    from selenium.webdriver.common.by import By

    folder.configure(likert="off", guidelines="## Rules\n\n- **Facts** over style\n- `=` for a tie\n\n"
                                              "<script>window.__g = 1</script><img src=x onerror=\"window.__g = 2\">\n")
    with label_server(folder.folder) as (url, _):
        open_page(browser, url, folder.add_labeler("ann"))
        panel = browser.find_element(By.ID, "guidelines")
        assert panel.find_element(By.TAG_NAME, "h4").text == "Rules"
        assert panel.find_element(By.CSS_SELECTOR, "li strong").text == "Facts"
        assert panel.find_element(By.CSS_SELECTOR, "li code").text == "="
        assert "<script>window.__g = 1</script>" in panel.text  # shown as text
        assert browser.execute_script("return window.__g") is None
        assert panel.find_elements(By.CSS_SELECTOR, "script, img, a") == []
        keys(browser, "g")
        assert not browser.find_element(By.ID, "guidelines-panel").is_displayed()

        assert browser.find_elements(By.CSS_SELECTOR, ".likert") == []  # no scores to give
        assert not browser.find_element(By.CSS_SELECTOR, ".likert-hint").is_displayed()
        items = browser.find_elements(By.CSS_SELECTOR, "#responses > li")
        browser.execute_script("arguments[0].focus()", items[1])
        keys(browser, "\ue013")  # ArrowUp
        browser.find_element(By.ID, "submit").click()
        wait_for(lambda: browser.find_element(By.ID, "prompt").text == "Say hi.", what="the next task")
    (label,) = folder.labels()
    assert label.likert is None and sorted(label.ranking) == [0, 1, 2, 3]


def test_researcher_browses_tasks_and_labels(tmp_path, browser):
    from selenium.webdriver.common.by import By

    store = FeedbackStore(tmp_path / "fb", create=True, settings=Settings(overlap_fraction=0.0))
    store.add_tasks([_task(f"prompt {i}", ["a", "b"]) for i in range(60)])
    ann_token, boss = store.add_labeler("ann"), store.add_labeler("boss", admin=True)
    with label_server(tmp_path / "fb") as (url, _):
        ann = Labeler(url, ann_token)
        task = ann.next()
        body = {"submission_id": "ann-first-01", "task_id": task["id"], "order": [0, 1], "likert": [6, 2]}
        first = ann.submit(body).json()["label_id"]
        assert ann.submit({**body, "submission_id": "ann-edit-001", "order": [1, 0], "likert": [2, 6],
                           "replaces": first}).status_code == 200
        open_page(browser, url, boss)
        wait_for(lambda: browser.current_url.endswith("/admin"), what="the researcher page")
        rng = browser.find_element(By.ID, "tasks-range")
        assert rng.text == "1\u201350 of 60" and len(browser.find_elements(By.CSS_SELECTOR, "#tasks tr")) == 51
        browser.find_element(By.ID, "tasks-next").click()
        wait_for(lambda: rng.text == "51\u201360 of 60", what="the second page")
        browser.find_element(By.ID, "tasks-prev").click()
        wait_for(lambda: rng.text == "1\u201350 of 60", what="the first page again")
        row = browser.find_elements(By.CSS_SELECTOR, "#tasks tr")[task["id"]]
        assert [td.text for td in row.find_elements(By.TAG_NAME, "td")][4:7] == ["1", "0", "1"]  # labels, skips, edits
        row.find_element(By.CSS_SELECTOR, "button").click()
        wait_for(lambda: browser.find_element(By.ID, "task-detail").is_displayed(), what="the task's labels")
        rows = browser.find_elements(By.CSS_SELECTOR, "#task-labels tr")[1:]
        cells = [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]
        assert [c[1] for c in cells] == ["ann", "ann"] and all(c[2] for c in cells)  # who, when
        assert rows[0].get_attribute("class") == "superseded" and cells[0][9].startswith("edited")
        assert cells[1][9] == f"current (edit of {first})"
        assert browser.find_element(By.ID, "task-title").text.startswith(f"Task {task['id']}")
