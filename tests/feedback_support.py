"""Helpers for the labeling-app tests: `tidal label serve` as a real subprocess, an HTTP labeler
(requests) and headless Debian Chromium through Selenium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import pytest
import requests

from tidal.feedback import schema
from tidal.feedback.store import FeedbackStore

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class CappedStore(FeedbackStore):
    """A store whose file may not grow past `pages` pages (0: no cap) in a write: SQLite's own
    SQLITE_FULL ("database or disk is full"), the error a full disk gives, without filling a
    disk (PRAGMA max_page_count holds per connection, so each write transaction sets it)."""

    pages = 0

    def _tx(self):
        @contextmanager
        def capped():
            with schema.transaction(self.path) as db:
                db.execute(f"PRAGMA max_page_count={self.pages}")
                yield db
        return capped()


@contextmanager
def label_server(folder):
    """Runs `tidal label serve FOLDER --port 0`; yields (url, Popen). SIGINT at the end."""
    proc = start_server(folder)
    url = proc.url
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_server(folder) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tidal.commands.cli", "label", "serve", str(folder), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line, deadline = "", time.monotonic() + 60
    while "label server on" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"tidal label serve exited with {proc.returncode} before serving")
        assert time.monotonic() < deadline, "tidal label serve did not start within 60 s"
    proc.url = re.search(r"on (http://\S+)", line).group(1)
    return proc


class Labeler:
    """A labeler over HTTP: logs in with its token like the login form does."""

    def __init__(self, url: str, token: str, timeout: float = 10.0):
        self.url, self.timeout = url, timeout
        self.http = requests.Session()
        self.login_status = self.login(token)
        self.csrf = self.http.get(url + "/api/me", timeout=timeout).json().get("csrf") if self.login_status == 303 else None

    def login(self, token: str) -> int:
        self.http.get(self.url + "/login", timeout=self.timeout)
        pre = self.http.cookies.get("tidal_login_csrf")
        r = self.http.post(self.url + "/login", data={"token": token, "csrf": pre}, allow_redirects=False, timeout=self.timeout)
        return r.status_code

    def next(self) -> dict | None:
        return self.http.get(self.url + "/api/next", timeout=self.timeout).json()["task"]

    def submit(self, body: dict, csrf: bool = True) -> requests.Response:
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        return self.http.post(self.url + "/api/submit", json=body, headers=headers, timeout=self.timeout)


def chromium_or_skip():
    """A headless Chromium WebDriver, or pytest.skip naming what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"no browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("no browser driver: the selenium package is missing (pip install selenium)")
    profile = tempfile.mkdtemp(prefix="tidal-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=900,1200"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.tidal_profile = profile
    return driver


def quit_browser(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.tidal_profile, ignore_errors=True)


def wait_for(cond, timeout=15.0, what="condition"):
    """Polls `cond`; an element of the page being replaced (navigation) just means: not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except (StaleElementReferenceException, NoSuchElementException):
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
