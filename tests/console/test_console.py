"""The web console in a real browser (headless Chromium): sign-in, live pools, pool and node
pages, Add/Update user seen on the node and over real OpenSSH, refusals (wrong key, missing CSRF
token, a bad field), phone-sized and keyboard use. Screenshots go to docs/console/."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
from selenium.common.exceptions import (NoSuchElementException, StaleElementReferenceException,
                                        WebDriverException)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import new_browser, shot

WAIT = 30  # seconds any one thing in a page may take to show


class Swapped(Exception):
    """An element found was gone from the document when used: a live update swapped <main>."""


def stale(exc: WebDriverException) -> bool:
    # Chromium reports some of these not as a stale element but as an inspector error.
    return isinstance(exc, StaleElementReferenceException) or \
        "does not belong to the document" in (exc.msg or "")


def wait(driver, what, timeout: float = WAIT, message: str = ""):
    # A live update may swap the page's content between finding an element and reading it.
    def attempt(d):
        try:
            return what(d)
        except WebDriverException as e:
            if isinstance(e, NoSuchElementException) or stale(e):
                raise Swapped() from e
            raise
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(Swapped,)).until(attempt, message)


def sign_in(driver, server, key: str | None = None) -> None:
    driver.get(f"{server.console}/sign-in")
    driver.find_element(By.NAME, "account").send_keys(server.account)
    driver.find_element(By.NAME, "key").send_keys(server.key if key is None else key)
    driver.find_element(By.XPATH, "//form//button[normalize-space()='Sign in']").click()


def mark(driver) -> None:
    """Marks this document, so a test can tell the page was not reloaded since."""
    driver.execute_script("window.__notReloaded = true;")


def not_reloaded(driver) -> bool:
    return driver.execute_script("return window.__notReloaded === true;")


def ssh_password(port: int, user: str, password: str) -> subprocess.CompletedProcess:
    """`echo hi` on a node over the real OpenSSH client with a password (sshpass); at most 60 s."""
    env = dict(os.environ, SSHPASS=password)
    return subprocess.run(
        ["timeout", "-k", "5", "60", "sshpass", "-e", "ssh", "-p", str(port),
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
         "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
         "-o", "BatchMode=no", f"{user}@127.0.0.1", "echo hi"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=70)


def user_cell(driver, user: str, column: int) -> str | None:
    """The text of `column` (1-based) of `user`'s row in the node's users table, or None."""
    rows = driver.find_elements(
        By.XPATH, f"//table[caption[contains(., 'Users of the node')]]/tbody/tr[td[1]='{user}']")
    if not rows:
        return None
    return rows[0].find_elements(By.TAG_NAME, "td")[column - 1].text.strip()


def login_rows(driver, user: str, outcome: str):
    return driver.find_elements(
        By.XPATH, f"//table[@id='logins']/tbody/tr[td[2]='{user}' and td[5]='{outcome}']")


@pytest.fixture(scope="module")
def pool(server):
    """A ready Linux pool of one node made through the API: (pool id, node id)."""
    return "web", server.ready_pool("web", 1)[0]


def test_sign_in_with_the_form_opens_the_pools_page(server, browser):
    browser.get(f"{server.console}/")
    wait(browser, lambda d: d.current_url.endswith("/_bluebatch/console/sign-in"),
         message="not sent to the sign-in form")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Sign in"
    shot(browser, "sign-in")
    sign_in(browser, server)
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Pools",
         message="no pools page after signing in")
    assert browser.current_url.rstrip("/").endswith("/_bluebatch/console")
    assert server.account in browser.find_element(By.CLASS_NAME, "who").text
    assert browser.find_element(By.XPATH, "//button[normalize-space()='Sign out']")


def test_a_wrong_key_cannot_sign_in(server, browser):
    wrong = "AAAA" + server.key[4:] if not server.key.startswith("AAAA") else "BBBB" + server.key[4:]
    sign_in(browser, server, key=wrong)
    alert = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "[role='alert']"),
                 message="no alert for a wrong key")
    assert alert.text.strip()
    assert browser.find_element(By.TAG_NAME, "h1").text == "Sign in"
    # Not signed in: the console still sends to the form.
    browser.get(f"{server.console}/")
    wait(browser, lambda d: d.current_url.endswith("/sign-in"), message="signed in anyway")


def test_a_pool_made_through_the_api_appears_live_while_it_allocates(server, browser):
    sign_in(browser, server)
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Pools")
    mark(browser)
    # Every text the pool's row shows, as the live updates swap the page.
    browser.execute_script("""
        window.__liveRows = [];
        new MutationObserver(function () {
          for (const tr of document.querySelectorAll('tbody tr')) {
            const a = tr.querySelector('td a');
            if (a && a.textContent === 'live') window.__liveRows.push(tr.textContent);
          }
        }).observe(document.getElementById('main'), {childList: true, subtree: true});""")
    server.create_pool("live", 2)
    link = wait(browser, lambda d: d.find_element(By.LINK_TEXT, "live"),
                message="the new pool did not appear without a reload")
    assert link
    row = "//tr[td[1]/a[text()='live']]"
    wait(browser, lambda d: "2 idle" in d.find_element(By.XPATH, row).text,
         message="the pool's nodes never showed idle on the page")
    assert "steady" in browser.find_element(By.XPATH, row).text
    assert not_reloaded(browser), "the page was reloaded; the update was not live"
    # The row was shown while the pool allocated, before its nodes were idle.
    seen = browser.execute_script("return window.__liveRows;")
    assert any("2 idle" not in t for t in seen), f"never shown before its nodes were idle: {seen}"
    assert any(w in t for t in seen for w in ("resizing", "creating", "starting")), seen
    shot(browser, "pools")


def fresh(act, tries: int = 5):
    """Runs `act` (find elements, fill, click) again when a live update swapped <main> under it:
    a stale element is raised before the element is used, so nothing was submitted."""
    for attempt in range(tries):
        try:
            return act()
        except WebDriverException as e:
            if not stale(e) or attempt == tries - 1:
                raise
            time.sleep(0.1)


def test_pool_to_node_add_user_ssh_login_and_update_with_empty_password(server, browser, pool):
    pool_id, node_id = pool
    sign_in(browser, server)
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Pools")
    wait(browser, lambda d: d.find_element(By.LINK_TEXT, pool_id)).click()
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == f"Pool {pool_id}")
    shot(browser, "pool-nodes")
    browser.find_element(By.LINK_TEXT, node_id).click()
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == f"Node {node_id}")
    port = int(browser.find_element(
        By.XPATH, "//dt[text()='SSH']/following-sibling::dd[1]/code").text.split()[2])

    # Add user through the form; the node page shows it stored and applied on the node.
    def add_erin():
        form = browser.find_element(By.ID, "add-user")
        form.find_element(By.NAME, "name").send_keys("erin")
        form.find_element(By.NAME, "password").send_keys("Pa55word")
        form.find_element(By.XPATH, ".//button[normalize-space()='Add user']").click()
    fresh(add_erin)
    wait(browser, lambda d: user_cell(d, "erin", 2) == "set", message="erin not listed")
    wait(browser, lambda d: user_cell(d, "erin", 8) == "yes",
         message="erin never shown applied on the node")
    mark(browser)

    # A real SSH login with the password; the activity list shows it without a reload.
    r = ssh_password(port, "erin", "Pa55word")
    assert (r.returncode, r.stdout.strip()) == (0, "hi"), r.stderr
    wait(browser, lambda d: login_rows(d, "erin", "accepted"),
         message="the accepted login did not appear live")
    assert not_reloaded(browser)
    row = wait(browser, lambda d: login_rows(d, "erin", "accepted")[0].text)
    assert "127.0.0.1" in row and "password" in row
    shot(browser, "node")

    # Update user with the password left empty: the password is gone, its login refused.
    def update_erin():
        upd = browser.find_element(By.XPATH, "//form[.//input[@id='erin-password']]")
        upd.find_element(By.NAME, "password").clear()
        upd.find_element(By.XPATH, ".//button[normalize-space()='Update user']").click()
    fresh(update_erin)
    wait(browser, lambda d: user_cell(d, "erin", 2) == "none",
         message="the password still shown set after the update")
    wait(browser, lambda d: user_cell(d, "erin", 8) == "yes")
    mark(browser)
    r = ssh_password(port, "erin", "Pa55word")
    assert r.returncode != 0, "the removed password still logs in"
    wait(browser, lambda d: login_rows(d, "erin", "refused"),
         message="the refused login did not appear live")
    assert not_reloaded(browser)
    # The activity list, both outcomes, newest first.
    browser.execute_script(
        "document.getElementById('logins').scrollIntoView({block: 'center'});")
    shot(browser, "node-logins")


def test_a_change_without_the_csrf_token_is_refused_and_nothing_changes(server, browser, pool):
    pool_id, node_id = pool
    sign_in(browser, server)
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Pools")
    node_url = f"{server.console}/pools/{pool_id}/nodes/{node_id}"
    browser.get(node_url)
    form = browser.find_element(By.ID, "add-user")
    browser.execute_script(
        "arguments[0].querySelector('input[name=csrf]').remove();", form)
    assert not form.find_elements(By.NAME, "csrf")
    form.find_element(By.NAME, "name").send_keys("mallory")
    form.find_element(By.NAME, "password").send_keys("Pa55word")
    form.find_element(By.XPATH, ".//button[normalize-space()='Add user']").click()
    alert = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "[role='alert']"),
                 message="no refusal shown")
    assert "CSRF" in alert.text
    assert browser.find_element(By.TAG_NAME, "h1").text == "Refused"
    # The status of that answer, as the browser got it.
    status = browser.execute_script(
        "const e = performance.getEntriesByType('navigation')[0];"
        "return e && e.responseStatus;")
    if status is not None:
        assert status == 403
    # Nothing changed: the node page lists no such user.
    browser.get(node_url)
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == f"Node {node_id}")
    assert user_cell(browser, "mallory", 1) is None


def test_a_bad_field_is_refused_next_to_the_field(server, browser, pool):
    pool_id, node_id = pool
    sign_in(browser, server)
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Pools")
    browser.get(f"{server.console}/pools/{pool_id}/nodes/{node_id}")
    form = browser.find_element(By.ID, "add-user")
    form.find_element(By.NAME, "name").send_keys("frank")
    form.find_element(By.NAME, "password").send_keys("Pa55word")
    form.find_element(By.NAME, "expiryTime").send_keys("next tuesday")
    form.find_element(By.XPATH, ".//button[normalize-space()='Add user']").click()
    err = wait(browser, lambda d: d.find_element(By.ID, "expiryTime-error"),
               message="no error next to expiryTime")
    assert err.get_attribute("role") == "alert"
    assert err.text.strip()
    # In the same field as the input, which points at it.
    field = err.find_element(By.XPATH, "./ancestor::div[contains(@class,'field')][1]")
    inp = field.find_element(By.NAME, "expiryTime")
    assert inp.get_attribute("aria-invalid") == "true"
    assert inp.get_attribute("aria-describedby") == "expiryTime-error"
    assert inp.get_attribute("value") == "next tuesday"
    assert user_cell(browser, "frank", 1) is None
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", err)
    shot(browser, "field-error")


def test_phone_sized_and_keyboard(server, pool):
    pool_id, node_id = pool
    driver = new_browser(390, 844)
    try:
        sign_in(driver, server)
        wait(driver, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Pools")
        wait(driver, lambda d: d.find_element(By.LINK_TEXT, pool_id))
        sw, iw = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert sw <= iw, f"pools page scrolls sideways on a phone: {sw} > {iw}"
        shot(driver, "pools-phone")
        driver.get(f"{server.console}/pools/{pool_id}/nodes/{node_id}")
        wait(driver, lambda d: d.find_element(By.TAG_NAME, "h1").text == f"Node {node_id}")
        sw, iw = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert sw <= iw, f"node page scrolls sideways on a phone: {sw} > {iw}"
        # Keyboard: TAB from the top reaches the Add user button.
        driver.find_element(By.TAG_NAME, "body").click()
        target = driver.find_element(By.XPATH, "//form[@id='add-user']//button")
        for _ in range(200):
            driver.switch_to.active_element.send_keys(Keys.TAB)
            if driver.switch_to.active_element == target:
                break
        else:
            pytest.fail("the Add user button is not reachable with TAB")
        outline = driver.execute_script(
            "const s = getComputedStyle(arguments[0]);"
            "return [s.outlineStyle, s.outlineWidth, s.boxShadow];", target)
        assert outline[0] != "none" or outline[2] != "none", f"no focus indicator: {outline}"
    finally:
        driver.quit()
