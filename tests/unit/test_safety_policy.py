"""The service side of content safety: modes, thresholds and labels, prompt terms, batching
checker calls off the event loop, and building it all from settings."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from impasto.backends.base import ReferenceImage
from impasto.backends.safety import NUDENET_DEFAULT_LABELS, NudeNetChecker
from impasto.protocol.errors import ContentBlocked, InferenceError, InvalidParameter
from impasto.protocol.tasks import ImageInferenceIn
from impasto.service.safety import (
    DEFAULT_PROMPT_TERMS,
    CheckerRunner,
    CheckerSafety,
    SafetyPolicy,
    TermListPromptChecker,
    UnavailableSafety,
    build_content_safety,
    read_prompt_terms,
    requested_mode,
    views,
    wants_input_check,
    wants_output_check,
)
from impasto.settings import Settings
from tests import safety_images


def task(**fields: Any) -> ImageInferenceIn:
    values: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "impasto:tiny@1",
        "positivePrompt": "a lighthouse on a cliff",
    }
    values.update(fields)
    return ImageInferenceIn.model_validate(values)


class FakeChecker:
    """Scores by image: `score_of(image)` for label X; records the images of each call."""

    name = "fake"
    labels = frozenset({"X", "Y"})
    default_labels = frozenset({"X"})
    input_size = 100

    def __init__(self, score_of: Any = None, max_batch_size: int = 8) -> None:
        self.score_of = score_of or (lambda image: 0.0)
        self.max_batch_size = max_batch_size
        self.calls: list[list[Image.Image]] = []

    def scores(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        self.calls.append(list(images))
        return [{"X": self.score_of(image), "Y": 1.0} for image in images]


def safety_with(checker: Any, **policy: Any) -> CheckerSafety:
    values: dict[str, Any] = {"labels": frozenset({"x"}), "threshold": 0.5}
    values.update(policy)
    return CheckerSafety(
        CheckerRunner(checker), SafetyPolicy(**values), TermListPromptChecker(["forbidden"])
    )


# -- modes and the hooks' triggers -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "fast", "full"])
def test_known_modes_are_accepted(mode: str) -> None:
    assert requested_mode(task(safety={"checkContent": True, "mode": mode})) == mode


def test_no_mode_means_the_servers_default() -> None:
    assert requested_mode(task(safety={"checkContent": True}), "full") == "full"
    assert requested_mode(task()) == "fast"


@pytest.mark.parametrize("mode", ["thorough", "FAST", ""])
def test_unknown_mode_is_an_invalid_safety_error_item(mode: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        requested_mode(task(safety={"checkContent": True, "mode": mode}))

    item = caught.value.to_item()
    assert item["code"] == "invalidSafety"
    assert item["parameter"] == "safety.mode"
    assert "none, fast, full" in item["message"]
    assert caught.value.http_status == 400


def test_checks_are_wanted_as_the_task_asks() -> None:
    assert not wants_output_check(task())
    assert wants_output_check(task(safety={"checkContent": True}))
    assert wants_output_check(task(checkNSFW=True))
    assert wants_output_check(task(checkNsfw=True))
    assert not wants_output_check(task(safety={"checkContent": True, "mode": "none"}))
    assert not wants_input_check(task(safety={"checkContent": True}))
    assert wants_input_check(task(safety={"blockContent": True}))
    assert not wants_input_check(task(safety={"blockContent": True, "mode": "none"}))


# -- thresholds and labels -------------------------------------------------------------------


def test_counted_labels_at_or_above_the_threshold_flag_ignoring_case() -> None:
    policy = SafetyPolicy(labels=frozenset({"NSFW", "porn"}), threshold=0.5)

    assert policy.flagged_labels({"nsfw": 0.5, "normal": 0.5}) == ["nsfw"]
    assert policy.flagged_labels({"nsfw": 0.49, "PORN": 0.9}) == ["porn"]
    assert policy.flagged_labels({"normal": 1.0}) == []


def test_threshold_zero_flags_every_image() -> None:
    policy = SafetyPolicy(labels=frozenset({"ANUS_EXPOSED"}), threshold=0.0)

    assert policy.flagged_labels({}) == ["anus_exposed"]


# -- prompt terms ----------------------------------------------------------------------------


def test_prompt_terms_match_whole_words_and_phrases_ignoring_case_and_width() -> None:
    checker = TermListPromptChecker(["nude", "sex act", "Porn"])

    assert checker.findings("A NUDE figure") == ["nude"]
    assert checker.findings("a sex\t act, porn") == ["sex act", "porn"]
    assert checker.findings("ｎｕｄｅ statue") == ["nude"]  # noqa: RUF001
    assert checker.findings("denuded hills, nudes, pornography, sexact") == []
    assert checker.findings("a lighthouse") == []


def test_default_prompt_terms_catch_explicit_prompts_only() -> None:
    checker = TermListPromptChecker(DEFAULT_PROMPT_TERMS)

    assert checker.findings("photo of a naked woman, nsfw") == ["naked", "nsfw"]
    assert checker.findings("a serene landscape with mountains and a lake") == []
    assert checker.findings("Essex coastline at sunset, sextant on a table") == []


def test_an_empty_term_list_finds_nothing() -> None:
    assert TermListPromptChecker([" ", ""]).findings("nude") == []


def test_prompt_terms_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "terms.txt"
    path.write_text("# house terms\nlighthouse\n\n  red  barn  # a phrase\n")

    assert read_prompt_terms(path) == ["lighthouse", "red  barn"]
    assert TermListPromptChecker(read_prompt_terms(path)).findings("A red barn") == ["red barn"]


# -- views per mode --------------------------------------------------------------------------


def test_fast_mode_checks_the_image_once() -> None:
    image = safety_images.landscape(1024)

    assert views(image, "fast", 320) == [image]


def test_full_mode_adds_four_overlapping_corner_tiles() -> None:
    image = safety_images.gradient(1000)

    seen = views(image, "full", 320)

    assert seen[0] is image
    assert [v.size for v in seen[1:]] == [(600, 600)] * 4
    assert seen[1].tobytes() == image.crop((0, 0, 600, 600)).tobytes()
    assert seen[4].tobytes() == image.crop((400, 400, 1000, 1000)).tobytes()


def test_full_mode_checks_an_image_no_larger_than_the_checker_input_once() -> None:
    image = safety_images.landscape(320)

    assert views(image, "full", 320) == [image]


# -- the runner: threads and batching --------------------------------------------------------


class GatedChecker(FakeChecker):
    """Its first call blocks until released, so the test can queue work behind it."""

    def __init__(self) -> None:
        super().__init__(score_of=lambda image: image.size[0] / 1000)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: set[str] = set()

    def scores(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(30)
        return super().scores(images)


def test_runner_batches_images_that_arrive_while_the_checker_is_busy() -> None:
    checker = GatedChecker()
    runner = CheckerRunner(checker, workers=1)
    images = [Image.new("RGB", (size, 8)) for size in (100, 200, 300, 400)]

    async def scenario() -> list[list[dict[str, float]]]:
        first = asyncio.ensure_future(runner.scores(images[:1]))
        assert await asyncio.to_thread(checker.entered.wait, 30)
        # The loop stays free while the checker runs: more work queues up behind it.
        second = asyncio.ensure_future(runner.scores(images[1:3]))
        third = asyncio.ensure_future(runner.scores(images[3:]))
        for _ in range(100):
            if len(runner._pending) == 3:
                break
            await asyncio.sleep(0)
        checker.release.set()
        return list(await asyncio.gather(first, second, third))

    results = asyncio.run(scenario())

    assert [len(call) for call in checker.calls] == [1, 3]
    assert runner.calls == 2
    assert [[r["X"] for r in result] for result in results] == [[0.1], [0.2, 0.3], [0.4]]
    assert threading.main_thread().name not in checker.threads


def test_runner_skips_images_whose_caller_has_gone() -> None:
    checker = GatedChecker()
    runner = CheckerRunner(checker, workers=1)
    kept, dropped = Image.new("RGB", (100, 8)), Image.new("RGB", (200, 8))

    async def scenario() -> None:
        first = asyncio.ensure_future(runner.scores([kept]))
        assert await asyncio.to_thread(checker.entered.wait, 30)
        gone = asyncio.ensure_future(runner.scores([dropped]))
        for _ in range(100):
            if runner._pending:
                break
            await asyncio.sleep(0)
        gone.cancel()
        checker.release.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(scenario())

    assert checker.calls == [[kept]]


def test_runner_splits_work_into_the_checkers_batch_size() -> None:
    checker = FakeChecker(max_batch_size=2)
    runner = CheckerRunner(checker)
    images = [Image.new("RGB", (8, 8)) for _ in range(5)]

    results = asyncio.run(runner.scores(images))

    assert len(results) == 5
    assert [len(call) for call in checker.calls] == [2, 2, 1]


def test_runner_passes_a_checker_failure_to_its_callers() -> None:
    class Broken(FakeChecker):
        def scores(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
            raise ValueError("corrupt")

    with pytest.raises(ValueError, match="corrupt"):
        asyncio.run(CheckerRunner(Broken()).scores([Image.new("RGB", (8, 8))]))


# -- CheckerSafety ---------------------------------------------------------------------------


def test_outputs_are_marked_and_returned_unless_withholding_is_on() -> None:
    checker = FakeChecker(
        score_of=lambda image: 0.9 if image.getpixel((0, 0)) == (255, 0, 0) else 0
    )
    images = [safety_images.solid("red", 64), safety_images.solid("blue", 64)]
    asked = task(safety={"checkContent": True})

    marked = asyncio.run(safety_with(checker).check_outputs(asked, images))
    withheld = asyncio.run(safety_with(checker, withhold_flagged=True).check_outputs(asked, images))

    assert [(v.nsfw, v.withhold) for v in marked] == [(True, False), (False, False)]
    assert [(v.nsfw, v.withhold) for v in withheld] == [(True, True), (False, False)]
    assert [len(call) for call in checker.calls] == [2, 2]


def test_outputs_are_not_checked_with_mode_none_or_when_not_asked() -> None:
    checker = FakeChecker()
    safety = safety_with(checker)
    images = [safety_images.solid("red", 64)]

    for asked in (task(), task(safety={"checkContent": True, "mode": "none"})):
        verdicts = asyncio.run(safety.check_outputs(asked, images))
        assert [v.nsfw for v in verdicts] == [None]
    assert checker.calls == []


def test_full_mode_takes_each_labels_highest_score_over_the_tiles() -> None:
    # Only the tiles (600 px) score high: fast misses what full finds.
    checker = FakeChecker(score_of=lambda image: 0.8 if image.size[0] == 600 else 0.1)
    safety = safety_with(checker, default_mode="fast")
    image = safety_images.gradient(1000)

    fast = asyncio.run(safety.check_outputs(task(checkNSFW=True), [image]))
    full = asyncio.run(
        safety.check_outputs(task(safety={"checkContent": True, "mode": "full"}), [image])
    )

    assert [v.nsfw for v in fast] == [False]
    assert [v.nsfw for v in full] == [True]
    assert [len(call) for call in checker.calls] == [1, 5]


def test_block_content_screens_the_positive_prompt_only() -> None:
    safety = safety_with(FakeChecker())

    with pytest.raises(ContentBlocked) as caught:
        asyncio.run(
            safety.screen_input(
                task(positivePrompt="a FORBIDDEN thing", safety={"blockContent": True}), []
            )
        )
    asyncio.run(
        safety.screen_input(
            task(negativePrompt="forbidden", safety={"blockContent": True}),
            [],
        )
    )
    asyncio.run(safety.screen_input(task(positivePrompt="forbidden"), []))

    item = caught.value.to_item()
    assert item["code"] == "sensitiveContentDetected"
    assert item["parameter"] == "positivePrompt"
    assert "forbidden" not in item["message"].lower()


def test_block_content_names_the_flagged_reference_image() -> None:
    checker = FakeChecker(score_of=lambda image: 0.9 if image.size == (70, 70) else 0.0)
    safety = safety_with(checker)
    references = [
        ReferenceImage(Image.new("RGB", (60, 60))),
        ReferenceImage(Image.new("RGB", (70, 70))),
    ]
    asked = task(
        safety={"blockContent": True},
        inputs={"referenceImages": ["a" * 8, "b" * 8]},
    )

    with pytest.raises(ContentBlocked) as caught:
        asyncio.run(safety.screen_input(asked, references))

    assert caught.value.parameter == "inputs.referenceImages[1]"
    assert [len(call) for call in checker.calls] == [2]


def test_block_content_screens_the_seed_and_guide_images_too() -> None:
    checker = FakeChecker(score_of=lambda image: 0.9 if image.size == (70, 70) else 0.0)
    safety = safety_with(checker)
    asked = task(safety={"blockContent": True})
    others = [
        ("seedImage", Image.new("RGB", (60, 60))),
        ("controlNet[0].guideImage", Image.new("RGB", (70, 70))),
    ]

    with pytest.raises(ContentBlocked) as caught:
        asyncio.run(
            safety.screen_input(asked, [ReferenceImage(Image.new("RGB", (60, 60)))], others)
        )

    assert caught.value.parameter == "controlNet[0].guideImage"
    # One call for all of them.
    assert [len(call) for call in checker.calls] == [3]


def test_a_failing_checker_fails_the_check_closed() -> None:
    class Broken(FakeChecker):
        def scores(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
            raise RuntimeError("boom")

    safety = safety_with(Broken())

    with pytest.raises(InferenceError, match="content check failed"):
        asyncio.run(safety.check_outputs(task(checkNSFW=True), [safety_images.solid("red", 64)]))


def test_real_detector_full_mode_finds_a_small_face_that_fast_mode_misses() -> None:
    checker = NudeNetChecker.load()
    safety = CheckerSafety(
        CheckerRunner(checker),
        SafetyPolicy(labels=frozenset({"FACE_FEMALE"}), threshold=0.76),
    )
    scene = safety_images.small_face_scene(1024, 200)

    def check(mode: str, image: Image.Image) -> bool | None:
        asked = task(safety={"checkContent": True, "mode": mode})
        return asyncio.run(safety.check_outputs(asked, [image]))[0].nsfw

    assert check("fast", scene) is False
    assert check("full", scene) is True
    assert check("full", safety_images.landscape()) is False


# -- UnavailableSafety -----------------------------------------------------------------------


def test_unavailable_safety_refuses_tasks_that_ask_for_checks_naming_the_parameter() -> None:
    safety = UnavailableSafety("it is turned off")

    for asked, parameter in (
        (task(safety={"checkContent": True}), "safety.checkContent"),
        (task(safety={"blockContent": True}), "safety.blockContent"),
        (task(checkNSFW=True), "checkNSFW"),
        (task(checkNsfw=True), "checkNsfw"),
    ):
        with pytest.raises(InvalidParameter) as caught:
            safety.validate(asked)
        assert caught.value.code == "unsupportedParameter"
        assert caught.value.parameter == parameter
        assert "not available on this server (it is turned off)" in caught.value.message
    safety.validate(task())
    safety.validate(task(safety={"checkContent": True, "mode": "none"}))
    with pytest.raises(InvalidParameter, match=r"safety\.mode"):
        safety.validate(task(safety={"mode": "thorough"}))


# -- building from settings ------------------------------------------------------------------


def settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(data_dir=tmp_path, **values)


def test_default_settings_build_nudenet_with_its_exposed_labels(tmp_path: Path) -> None:
    safety = build_content_safety(settings(tmp_path))

    assert isinstance(safety, CheckerSafety)
    assert safety.runner.checker.name == "nudenet"
    assert safety.policy.labels == NUDENET_DEFAULT_LABELS
    assert safety.policy.threshold == 0.5
    assert safety.policy.default_mode == "fast"
    assert not safety.policy.withhold_flagged
    assert safety.prompts is not None
    assert set(DEFAULT_PROMPT_TERMS) <= set(safety.prompts.terms)


def test_settings_choose_labels_threshold_mode_and_terms(tmp_path: Path) -> None:
    terms = tmp_path / "terms.txt"
    terms.write_text("lighthouse\n")

    safety = build_content_safety(
        settings(
            tmp_path,
            safety_labels="FACE_FEMALE, face_male",
            safety_threshold=0.3,
            safety_mode="full",
            safety_withhold_flagged=True,
            safety_prompt_terms="",
            safety_prompt_terms_file=terms,
        )
    )

    assert isinstance(safety, CheckerSafety)
    assert safety.policy.labels == {"FACE_FEMALE", "face_male"}
    assert safety.policy.threshold == 0.3
    assert safety.policy.default_mode == "full"
    assert safety.policy.withhold_flagged
    assert safety.prompts is not None
    assert safety.prompts.terms == ("lighthouse",)


def test_environment_configures_safety(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPASTO_SAFETY_CHECKER", "none")
    monkeypatch.setenv("IMPASTO_SAFETY_LABELS", "A,B")
    monkeypatch.setenv("IMPASTO_SAFETY_THRESHOLD", "0.25")
    monkeypatch.setenv("IMPASTO_SAFETY_WITHHOLD_FLAGGED", "true")

    values = Settings(data_dir=tmp_path)

    assert values.safety_checker == "none"
    assert values.safety_labels == ["A", "B"]
    assert values.safety_threshold == 0.25
    assert values.safety_withhold_flagged


def test_unknown_default_mode_setting_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fast or full"):
        settings(tmp_path, safety_mode="none")


@pytest.mark.parametrize(
    ("values", "logged"),
    [
        ({"safety_checker": "none"}, "content checking is off"),
        ({"safety_checker": "hf:/no/such/model"}, "no model directory at /no/such/model"),
        ({"safety_checker": "opennsfw"}, "unknown checker"),
        ({"safety_labels": "NUDE"}, "does not give: NUDE"),
        ({"safety_prompt_terms_file": "/no/such/terms.txt"}, "cannot be read"),
    ],
)
def test_settings_that_cannot_work_warn_and_fail_checks_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, values: dict[str, Any], logged: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="impasto.safety"):
        safety = build_content_safety(settings(tmp_path, **values))

    assert isinstance(safety, UnavailableSafety)
    assert logged in caplog.text
    with pytest.raises(InvalidParameter, match="not available"):
        safety.validate(task(checkNSFW=True))
