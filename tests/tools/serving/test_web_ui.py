"""`align serve`'s web UI in a real headless browser (Debian's chromium and chromium-driver through selenium, offline):
upload a held-out picture of the demo, ask, read the streamed reply from the page and compare it with `align chat
--question`; multi-turn, regenerate, clear, a new image, a bad image and a too-long question, all in the page.

CI installs the browser (.ci/run) and sets ALIGN_REQUIRE_BROWSER, so there this test fails rather than skips."""

import os
import shutil
from pathlib import Path

import pytest

from align.constants import DEFAULT_QUESTION
from conftest import run_align
from live_server import LiveServer

pytestmark = pytest.mark.slow
os.environ["SE_OFFLINE"] = "true"  # selenium must not fetch a driver: Debian's chromium-driver is the one


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("ALIGN_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def ui(demo):
    ws, _, home = demo
    server = LiveServer(["--adapter", ws / "runs/chat/adapter", "--model", ws / "llm", "--encoder", ws / "encoder",
                         "--examples", ws / "images" / "held_out", "--no-api"], home)
    yield server, ws, home
    server.stop()


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Offline as the machine it is served on may be: every name but 127.0.0.1 fails to resolve.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield browser
    browser.quit()


def held_out(ws, i=0) -> Path:
    return sorted((ws / "images" / "held_out").glob("*.png"))[i]


def chat_answer(ws, home, image: Path, *questions: str) -> list[str]:
    asked = [a for q in questions for a in ("--question", q)]
    result = run_align("chat", "--adapter", ws / "runs/chat/adapter", "--model", ws / "llm", "--encoder",
                       ws / "encoder", "--image", image, *asked, home=home)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()


class Page:
    """The served page as a user drives it."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.wait = driver, WebDriverWait(driver, 60, poll_frequency=0.05)
        driver.get(url)
        # every control the tests use is on the page (gradio renders them one after another)
        self.wait.until(lambda d: all(self.find(css) for css in ("#image input[type=file]", "#question textarea",
                                                                "#system textarea", "#send", "#clear")))

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def upload(self, image: Path) -> None:
        self.find("#image input[type=file]")[0].send_keys(str(image))
        self.wait.until(lambda d: self.find("#image img") and not self.bot_replies())

    def texts(self, css: str) -> list[str]:
        """The text of every element `css` selects, read at one moment (elements are replaced as text streams)."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText.trim())", css)

    def bot_replies(self) -> list[str]:
        return self.texts("#chat .bot")

    def status(self) -> str:
        return "".join(self.texts("#status"))

    def ask(self, question: str) -> str:
        """Type a question, press Enter and wait for the reply to finish streaming (its text stops changing)."""
        from selenium.webdriver.common.keys import Keys

        before = len(self.bot_replies())
        box = self.find("#question textarea")[0]
        box.clear()
        box.send_keys(question)
        box.send_keys(Keys.ENTER)
        return self.settled(lambda replies: len(replies) > before and replies[-1])

    def click(self, name: str) -> None:
        self.find(f"#{name}")[0].click()

    def settled(self, ready) -> str:
        """The last reply once `ready` holds and the page stops changing for half a second."""
        seen = []

        def still(driver):
            replies = self.bot_replies()
            if not ready(replies):
                seen.clear()
                return False
            seen.append(replies[-1])
            return len(seen) >= 10 and len(set(seen[-10:])) == 1 and not self.find(".generating")

        self.wait.until(still)
        return seen[-1]


def test_the_page_answers_an_uploaded_picture_as_align_chat_does_fetching_nothing_from_elsewhere(ui, driver):
    server, ws, home = ui
    page = Page(driver, server.url)
    about = page.find("#about")[0].text
    assert "demo-tiny" in about and "chatml" in about and "runs/chat/adapter" in about
    page.upload(held_out(ws))
    reply = page.ask(DEFAULT_QUESTION)
    assert reply == chat_answer(ws, home, held_out(ws), DEFAULT_QUESTION)[0] and reply.startswith("It is a ")
    assert page.status() == ""
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and [u for u in loaded if not u.startswith(server.url)] == []
    if os.environ.get("ALIGN_SCREENSHOT"):  # the README's picture comes from here
        driver.save_screenshot(os.environ["ALIGN_SCREENSHOT"])


def test_multi_turn_regenerate_clear_and_a_new_image_starting_a_new_conversation(ui, driver):
    server, ws, home = ui
    page = Page(driver, server.url)
    page.upload(held_out(ws, 1))
    first = page.ask(DEFAULT_QUESTION)
    second = page.ask("What colour is it?")
    assert page.bot_replies() == [first, second] == chat_answer(ws, home, held_out(ws, 1), DEFAULT_QUESTION, "What colour is it?")
    page.click("regenerate")  # greedy: the same reply again, in place of the last
    assert page.settled(lambda replies: len(replies) == 2) == second and page.bot_replies() == [first, second]
    page.click("clear")
    page.wait.until(lambda d: page.bot_replies() == [])
    assert page.ask(DEFAULT_QUESTION) == first  # same image, new conversation
    page.upload(held_out(ws, 5))  # a new image: the conversation starts again
    assert page.bot_replies() == []
    assert page.ask(DEFAULT_QUESTION) == chat_answer(ws, home, held_out(ws, 5), DEFAULT_QUESTION)[0]


def test_an_example_picked_in_the_page_is_the_image_talked_about(ui, driver):
    server, ws, home = ui
    page = Page(driver, server.url)
    examples = page.find(".gallery img")
    assert len(examples) >= 10  # the held-out pictures given with --examples (a page of them)
    examples[2].click()
    page.wait.until(lambda d: page.find("#image img"))
    assert page.ask(DEFAULT_QUESTION) == chat_answer(ws, home, held_out(ws, 2), DEFAULT_QUESTION)[0]


def test_a_bad_image_and_a_too_long_question_are_one_readable_message_in_the_page(ui, driver, tmp_path):
    server, ws, _ = ui
    page = Page(driver, server.url)
    broken = tmp_path / "broken.png"
    broken.write_bytes(held_out(ws).read_bytes()[:200])
    page.upload(broken)
    box = page.find("#question textarea")[0]
    box.send_keys(DEFAULT_QUESTION)
    page.click("send")
    page.wait.until(lambda d: page.status().startswith("⚠️"))
    assert page.status() == "⚠️ cannot read this image: corrupt or truncated image data: image file is truncated"
    assert "Traceback" not in driver.page_source and page.bot_replies() == []
    kept = driver.execute_script("return document.querySelector('#question textarea').value")
    assert kept == DEFAULT_QUESTION  # the question is kept, to try again
    page = Page(driver, server.url)
    page.upload(held_out(ws))
    page.find("#question textarea")[0].send_keys("red " * 300)  # typed as a user types: the page takes it in
    page.click("send")
    page.wait.until(lambda d: page.status().startswith("⚠️"))
    assert "past the model's context" in page.status() and "Traceback" not in driver.page_source
    assert page.ask(DEFAULT_QUESTION).startswith("It is a ")  # and the page still works


def test_the_sliders_and_the_system_prompt_reach_the_model(ui, driver):
    from selenium.webdriver.common.keys import Keys

    server, ws, home = ui
    page = Page(driver, server.url)
    assert driver.execute_script("return document.querySelector('#system textarea').value") == "You are a helpful assistant."
    page.upload(held_out(ws))
    full = page.ask(DEFAULT_QUESTION)
    page.find("#generation button.label-wrap")[0].click()  # open the Generation panel
    page.wait.until(lambda d: any(e.is_displayed() for e in page.find("#max-new-tokens input[type=number]")))
    number = page.find("#max-new-tokens input[type=number]")[0]
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys("2", Keys.TAB)
    page.click("clear")
    page.wait.until(lambda d: page.bot_replies() == [])
    short = page.ask(DEFAULT_QUESTION)
    assert full.startswith(short) and len(short.split()) == 2  # two tokens: "It is"
