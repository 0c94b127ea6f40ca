"""The playground at `GET /` in a real chromium, against a real server with the tiny model: it
speaks the WebSocket protocol as an SDK does, shows live progress, the server's own errors,
and keeps recent tasks across reloads."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from tests.browser.conftest import REPO, Playground, ProgressHold, expect
from tests.conftest import RunningServer, image_bytes

GENERATION_TIMEOUT_MS = 120_000


def test_generates_two_images_with_live_progress_and_downloads_one(
    playground: Playground,
    open_server: RunningServer,
    progress_hold: ProgressHold,
    tmp_path: Path,
) -> None:
    page = playground.page
    playground.open(open_server)
    playground.wait_ready("impasto:tiny@1")
    playground.choose_size(128, 128)
    playground.testid("number-results").select_option("2")
    playground.testid("output-format").select_option("PNG")
    playground.testid("seed").fill("1234")
    playground.testid("steps").fill("2")
    playground.testid("prompt").fill("a lighthouse at dusk, thick impasto brushwork")

    with progress_hold.holding():
        playground.testid("generate").click()
        # Held after its first step (of 2): getResponse reports 50 and a tile shows it.
        assert progress_hold.reached.wait(GENERATION_TIMEOUT_MS / 1000)
        expect(playground.testid("progress")).to_have_count(2)
        expect(
            page.locator('[data-testid="pending-tile"][data-progress="50"]').first
        ).to_be_visible()
        expect(playground.testid("progress").first).to_have_js_property("value", 50)

    items = playground.testid("gallery-item")
    expect(items).to_have_count(2, timeout=GENERATION_TIMEOUT_MS)
    expect(playground.testid("progress")).to_have_count(0)
    for i in range(2):
        expect(items.nth(i)).to_have_attribute("data-loaded", "true")
        size = items.nth(i).locator("img").evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert size == [128, 128]
        expect(items.nth(i).get_by_test_id("pixel-size")).to_have_text("128 \u00d7 128")
        expect(items.nth(i).get_by_test_id("cost")).to_have_text("$0")
    seeds = {items.nth(i).get_attribute("data-seed") for i in range(2)}
    assert seeds == {"1234", "1235"}

    (inference,) = playground.sent_tasks("imageInference")
    assert playground.sent[0] == [{"taskType": "authentication", "apiKey": "playground"}]
    assert {k: inference[k] for k in ("deliveryMethod", "outputType", "includeCost")} == {
        "deliveryMethod": "async",
        "outputType": "URL",
        "includeCost": True,
    }
    assert (inference["model"], inference["width"], inference["height"]) == (
        "impasto:tiny@1",
        128,
        128,
    )
    assert (inference["numberResults"], inference["outputFormat"]) == (2, "PNG")
    assert (inference["seed"], inference["steps"]) == (1234, 2)
    polls = [
        t for t in playground.sent_tasks("getResponse") if t["taskUUID"] == inference["taskUUID"]
    ]
    assert len(polls) >= 2

    with page.expect_download() as download_info:
        items.first.get_by_test_id("download").click()
    download = download_info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    with Image.open(saved) as image:
        assert (image.format, image.size) == ("PNG", (128, 128))
    assert saved.name == f"impasto-{items.first.get_attribute('data-image-uuid')}.png"

    screenshot = tmp_path / "playground.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(screenshot), full_page=True)
    copies = [REPO / "test-output" / "browser" / "playground.png"]
    if os.environ.get("IMPASTO_UPDATE_SCREENSHOT") == "1":
        copies.append(REPO / "docs" / "images" / "playground.png")
    for copy in copies:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, copy)
    print(f"playground screenshot: {screenshot} (copied to {', '.join(map(str, copies))})")
    assert playground.problems == []


def test_empty_prompt_shows_the_servers_error_and_no_image(
    playground: Playground, open_server: RunningServer
) -> None:
    playground.open(open_server)
    playground.wait_ready("impasto:tiny@1")
    playground.testid("prompt").fill("")
    playground.testid("generate").click()

    error = playground.testid("error")
    expect(error.get_by_test_id("error-code")).to_have_text("invalidPositivePrompt")
    expect(error.get_by_test_id("error-parameter")).to_have_text("parameter: positivePrompt")
    # The server's own words, as it sent them.
    (task,) = playground.sent_tasks("imageInference")
    (refusal,) = playground.received_errors(task["taskUUID"])
    assert (refusal["code"], refusal["parameter"]) == ("invalidPositivePrompt", "positivePrompt")
    expect(error.get_by_test_id("error-message")).to_have_text(refusal["message"])
    # The task was refused, so nothing of it remains: no tile, no recent entry.
    expect(playground.testid("task")).to_have_count(0)
    expect(playground.testid("gallery-item")).to_have_count(0)
    expect(playground.testid("recent-item")).to_have_count(0)
    assert task["positivePrompt"] == ""
    assert playground.problems == []


def test_api_key_wrong_is_refused_and_right_one_generates(
    playground: Playground, keyed_server: RunningServer
) -> None:
    playground.open(keyed_server)
    connection = playground.testid("connection")
    expect(connection).to_have_attribute("data-state", "auth-failed")

    playground.testid("api-key").fill("wrong")
    playground.testid("apply-key").click()
    expect(playground.testid("error").get_by_test_id("error-code")).to_have_text("invalidApiKey")
    expect(connection).to_have_attribute("data-state", "auth-failed")
    assert playground.sent_tasks("authentication")[-1] == {
        "taskType": "authentication",
        "apiKey": "wrong",
    }

    playground.testid("api-key").fill("k1")
    playground.testid("apply-key").click()
    expect(connection).to_have_attribute("data-state", "open")
    expect(playground.testid("error")).to_be_hidden()
    playground.wait_ready("impasto:tiny@1")
    playground.choose_size(64, 64)
    playground.testid("steps").fill("1")
    playground.testid("prompt").fill("a key that works")
    playground.testid("generate").click()
    expect(playground.testid("gallery-item")).to_have_count(1, timeout=GENERATION_TIMEOUT_MS)
    assert playground.page.evaluate("localStorage.getItem('impasto.playground.apiKey')") == '"k1"'
    assert playground.problems == []


def test_recent_tasks_survive_a_reload_with_their_images(
    playground: Playground, open_server: RunningServer
) -> None:
    page = playground.page
    playground.open(open_server)
    playground.wait_ready("impasto:tiny@1")
    playground.choose_size(64, 64)
    playground.testid("steps").fill("1")
    playground.testid("prompt").fill("remembered across reloads")
    playground.testid("generate").click()
    item = playground.testid("gallery-item")
    expect(item).to_have_count(1, timeout=GENERATION_TIMEOUT_MS)
    image_uuid = item.get_attribute("data-image-uuid")
    task_uuid = item.get_attribute("data-task-uuid")

    # An older task the server no longer has (or never had) is listed too.
    forgotten = str(uuid.uuid4())
    page.evaluate(
        """(uuid) => {
            const key = "impasto.playground.recent";
            const list = JSON.parse(localStorage.getItem(key));
            list.push({taskUUID: uuid, prompt: "long gone", model: "impasto:tiny@1",
                       width: 64, height: 64, numberResults: 1, time: 0});
            localStorage.setItem(key, JSON.stringify(list));
        }""",
        forgotten,
    )

    page.reload()
    recent = playground.testid("recent-item")
    expect(recent).to_have_count(2)
    kept = recent.first
    expect(kept).to_have_attribute("data-task-uuid", str(task_uuid))
    expect(kept).to_contain_text("remembered across reloads")
    again = page.locator(f'[data-testid="gallery-item"][data-image-uuid="{image_uuid}"]')
    expect(again).to_have_attribute("data-loaded", "true", timeout=GENERATION_TIMEOUT_MS)
    expect(kept.get_by_test_id("recent-status")).to_have_text("done")
    gone = page.locator(f'[data-testid="task"][data-task-uuid="{forgotten}"]')
    expect(gone.get_by_test_id("expired")).to_have_count(1)
    expect(recent.last.get_by_test_id("recent-status")).to_have_text("expired")
    # taskNotFound for a remembered task is its state, not an error to shout about.
    expect(playground.testid("error")).to_be_hidden()
    polls = playground.sent_tasks("getResponse")
    assert {"taskType": "getResponse", "taskUUID": task_uuid} in polls
    assert {"taskType": "getResponse", "taskUUID": forgotten} in polls
    assert playground.problems == []


def test_seed_image_is_uploaded_and_used_for_img2img(
    playground: Playground, open_server: RunningServer
) -> None:
    playground.open(open_server)
    playground.wait_ready("impasto:tiny@1")
    expect(playground.testid("seed-image-mode")).to_be_visible()
    playground.testid("seed-image-input").set_input_files(
        {"name": "seed.png", "mimeType": "image/png", "buffer": image_bytes((64, 64))}
    )
    upload = playground.testid("seed-image-list").get_by_test_id("upload")
    expect(upload).to_have_attribute("data-state", "ready")
    seed_uuid = upload.get_attribute("data-image-uuid")
    playground.choose_size(64, 64)
    playground.testid("steps").fill("2")
    playground.testid("strength").fill("0.5")
    playground.testid("prompt").fill("from a red square")
    playground.testid("generate").click()
    expect(playground.testid("gallery-item")).to_have_count(1, timeout=GENERATION_TIMEOUT_MS)

    (sent_upload,) = playground.sent_tasks("imageUpload")
    assert sent_upload["image"].startswith("data:image/png;base64,")
    (inference,) = playground.sent_tasks("imageInference")
    assert (inference["seedImage"], inference["strength"]) == (seed_uuid, 0.5)
    assert playground.problems == []


def test_reconnects_when_the_socket_closes_and_resumes_its_session(
    playground: Playground, server_factory: Callable[..., RunningServer]
) -> None:
    # The server closes a socket idle for half a second: the page must come back on its own.
    server = server_factory(safety_checker="none", ws_idle_timeout_s=0.5)
    page = playground.page
    playground.open(server)
    expect(playground.testid("connection")).to_have_attribute("data-state", "open")
    with page.expect_event("websocket"):
        pass
    expect(playground.testid("connection")).to_have_attribute("data-state", "open")

    logins = playground.sent_tasks("authentication")
    sessions = [
        item["connectionSessionUUID"]
        for frame in playground.received
        for item in frame.get("data", [])
        if item.get("taskType") == "authentication"
    ]
    assert len(logins) >= 2
    assert "connectionSessionUUID" not in logins[0]
    assert logins[1]["connectionSessionUUID"] == sessions[0]
    assert set(sessions) == {sessions[0]}
    assert playground.problems == []


def test_size_picker_lists_the_sizes_modelsearch_reports(
    playground: Playground, open_server: RunningServer
) -> None:
    """modelSearch reports each model's allowed sizes (the 16 Runway sizes) or its side
    limits, and the picker offers exactly those."""
    runway_sizes = [
        (1920, 1080), (1080, 1920), (1024, 1024), (1360, 768), (1080, 1080), (1168, 880),
        (1440, 1080), (1080, 1440), (1808, 768), (2112, 912), (1280, 720), (720, 1280),
        (720, 720), (960, 720), (720, 960), (1680, 720),
    ]  # fmt: skip
    playground.open(open_server)
    playground.wait_ready("runway:4@1")
    options = playground.testid("size").locator("option")
    expect(options).to_have_count(16)
    values = options.evaluate_all("options => options.map(o => o.value)")
    assert sorted(values) == sorted(f"{w}x{h}" for w, h in runway_sizes)
    expect(playground.testid("size")).to_have_value("1024x1024")

    playground.testid("model").select_option("impasto:tiny@1")
    values = options.evaluate_all("options => options.map(o => o.value)")
    assert values[0] == "512x512"
    assert {"128x128", "1024x1024", "custom"} <= set(values)
    assert all(int(v.split("x")[0]) <= 2048 for v in values if v != "custom")
    playground.choose_size(128, 128)
    expect(playground.testid("width")).to_be_hidden()
    assert playground.problems == []


def test_private_images_are_shown_by_fetching_them_with_the_key(
    playground: Playground, server_factory: Callable[..., RunningServer]
) -> None:
    server = server_factory(api_keys=["k1"], safety_checker="none", private_images=True)
    playground.open(server)
    playground.testid("api-key").fill("k1")
    playground.testid("apply-key").click()
    playground.wait_ready("impasto:tiny@1")
    playground.choose_size(64, 64)
    playground.testid("steps").fill("1")
    playground.testid("prompt").fill("only for k1")
    playground.testid("generate").click()
    tile = playground.testid("gallery-item")
    expect(tile).to_have_count(1, timeout=GENERATION_TIMEOUT_MS)
    expect(tile).to_have_attribute("data-loaded", "true")
    assert tile.get_by_role("img").get_attribute("src").startswith("blob:")
    expect(tile.get_by_test_id("pixel-size")).to_have_text("64 \u00d7 64")
    # The first, keyless load of the URL is refused; that is the only complaint.
    assert all("401" in problem for problem in playground.problems), playground.problems
