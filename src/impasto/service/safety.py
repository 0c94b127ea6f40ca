"""Content safety as the inference service sees it: screening a request before generation
(`safety.blockContent`) and checking each output (`safety.checkContent`, legacy `checkNSFW`).

`CheckerSafety` holds the policy (threshold, labels that count, prompt terms, modes,
withholding) and runs an `ImageChecker` from `impasto.backends.safety` in worker threads.
`UnavailableSafety` stands in when no checker could be loaded. docs/safety.md is the operator's
view of the same.

Modes (`safety.mode`): "none" checks nothing; "fast" runs the checker once per image, at the
checker's own input size; "full" also checks four overlapping corner tiles, each 60% of the
image's width and height, so that small details are seen at about 1.7 times the resolution
(images no larger than the checker's input are checked once). A label's score is its highest
over the views.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from impasto.backends.base import ReferenceImage
from impasto.backends.safety import CheckerUnavailable, ImageChecker, load_image_checker
from impasto.protocol.errors import ContentBlocked, InferenceError, InvalidParameter
from impasto.protocol.tasks import ImageInferenceIn
from impasto.settings import Settings

log = logging.getLogger("impasto.safety")

SAFETY_MODES = ("none", "fast", "full")
# Each tile of "full" mode covers this fraction of the image's width and height.
TILE_FRACTION = 0.6

# A few unambiguous terms; operators extend or replace them (docs/safety.md). Only the
# positive prompt is screened: negative prompts name what to avoid.
DEFAULT_PROMPT_TERMS = (
    "nsfw",
    "nude",
    "nudes",
    "nudity",
    "naked",
    "porn",
    "porno",
    "pornographic",
    "pornography",
    "hentai",
    "xxx",
    "topless",
    "genitals",
    "genitalia",
    "sex act",
    "sexual intercourse",
)


@dataclass(frozen=True)
class OutputVerdict:
    """What the output check found: the NSFWContent flag, and whether to withhold the image."""

    nsfw: bool | None
    withhold: bool = False


def requested_mode(task: ImageInferenceIn, default: str = "fast") -> str:
    """The task's safety.mode, or `default`; an unknown mode is an error item."""
    mode = task.safety.mode if task.safety is not None else None
    if mode is None:
        return default
    if mode not in SAFETY_MODES:
        raise InvalidParameter(
            f"Invalid value for safety.mode parameter: {mode!r} is not one of "
            f"{', '.join(SAFETY_MODES)}.",
            code="invalidSafety",
            parameter="safety.mode",
        )
    return mode


def wants_output_check(task: ImageInferenceIn) -> bool:
    safety = task.safety
    if safety is not None and safety.mode == "none":
        return False
    legacy = bool(task.checkNSFW or task.checkNsfw)
    return legacy or bool(safety is not None and safety.checkContent)


def wants_input_check(task: ImageInferenceIn) -> bool:
    safety = task.safety
    if safety is not None and safety.mode == "none":
        return False
    return bool(safety is not None and safety.blockContent)


def _asking_parameter(task: ImageInferenceIn) -> str:
    if wants_input_check(task):
        return "safety.blockContent"
    if task.safety is not None and task.safety.checkContent:
        return "safety.checkContent"
    return "checkNSFW" if task.checkNSFW else "checkNsfw"


class ContentSafety(Protocol):
    """The inference service's safety hooks."""

    def validate(self, task: ImageInferenceIn) -> None:
        """Raise an error item if the task asks for checks this server cannot do."""

    async def screen_input(
        self,
        task: ImageInferenceIn,
        references: Sequence[ReferenceImage],
        others: Sequence[tuple[str, Image.Image]] = (),
    ) -> None:
        """For blockContent: raise ContentBlocked if the prompt or an input image is flagged
        (the references, and `others`: the seed, guide and IP-Adapter images by parameter)."""

    async def check_outputs(
        self, task: ImageInferenceIn, images: Sequence[Image.Image]
    ) -> list[OutputVerdict]:
        """For checkContent: one verdict per generated image."""


class UnavailableSafety:
    """Used when no checker is installed: tasks that ask for checks fail with a clear error."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason or "install impasto[safety] or configure a checker"

    def validate(self, task: ImageInferenceIn) -> None:
        requested_mode(task)
        if wants_output_check(task) or wants_input_check(task):
            raise InvalidParameter(
                f"Content checking is not available on this server ({self.reason}).",
                code="unsupportedParameter",
                parameter=_asking_parameter(task),
            )

    async def screen_input(
        self,
        task: ImageInferenceIn,
        references: Sequence[ReferenceImage],
        others: Sequence[tuple[str, Image.Image]] = (),
    ) -> None:
        self.validate(task)

    async def check_outputs(
        self, task: ImageInferenceIn, images: Sequence[Image.Image]
    ) -> list[OutputVerdict]:
        self.validate(task)
        return [OutputVerdict(nsfw=None) for _ in images]


# -- prompts ---------------------------------------------------------------------------------


class PromptChecker(Protocol):
    """Screens prompt text; a text classifier can stand behind this as well as a term list."""

    def findings(self, text: str) -> list[str]:
        """What in `text` is objectionable (matched terms, labels); empty when it is clean."""


def _normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


class TermListPromptChecker:
    """Flags prompts that contain a listed term as a whole word or phrase, ignoring case and
    Unicode look-alike forms; whitespace inside a phrase may vary."""

    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = tuple(dict.fromkeys(t for t in (_normalize(t).strip() for t in terms) if t))
        patterns = [r"\s+".join(re.escape(word) for word in term.split()) for term in self.terms]
        self._pattern = (
            re.compile(r"(?<!\w)(?:" + "|".join(patterns) + r")(?!\w)") if patterns else None
        )

    def findings(self, text: str) -> list[str]:
        if self._pattern is None:
            return []
        found = (" ".join(m.group(0).split()) for m in self._pattern.finditer(_normalize(text)))
        return list(dict.fromkeys(found))


def read_prompt_terms(path: Path) -> list[str]:
    """One term per line; blank lines and `#` comments are skipped."""
    terms = []
    for line in path.read_text(encoding="utf-8").splitlines():
        term = line.split("#", 1)[0].strip()
        if term:
            terms.append(term)
    return terms


# -- images ----------------------------------------------------------------------------------


def views(image: Image.Image, mode: str, input_size: int) -> list[Image.Image]:
    """What the checker looks at for one image in `mode` (see the module docstring)."""
    width, height = image.size
    if mode != "full" or min(width, height) <= input_size:
        return [image]
    tile_w, tile_h = round(width * TILE_FRACTION), round(height * TILE_FRACTION)
    corners = [(x, y) for x in (0, width - tile_w) for y in (0, height - tile_h)]
    return [image, *(image.crop((x, y, x + tile_w, y + tile_h)) for x, y in corners)]


class CheckerRunner:
    """Runs an ImageChecker in worker threads so the event loop never waits on it.

    At most `workers` checker calls run at once; images that arrive while they run are
    gathered into the next call, up to the checker's batch size, so concurrent tasks share
    calls without any added wait when the checker is idle.
    """

    def __init__(self, checker: ImageChecker, workers: int = 1) -> None:
        self.checker = checker
        self._workers = max(1, workers)
        self._pending: deque[tuple[Image.Image, asyncio.Future[dict[str, float]]]] = deque()
        self._running = 0
        self._drains: set[asyncio.Task[None]] = set()
        self.calls = 0  # checker calls made, for tests and metrics

    async def scores(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        if not images:
            return []
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[dict[str, float]]] = [loop.create_future() for _ in images]
        self._pending.extend(zip(images, futures, strict=True))
        while self._running < self._workers and self._pending:
            self._running += 1
            drain = loop.create_task(self._drain(), name="safety-check")
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
        results: list[dict[str, float]] = []
        for result in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
            results.append(result)
        return results

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch: list[tuple[Image.Image, asyncio.Future[dict[str, float]]]] = []
                while self._pending and len(batch) < self.checker.max_batch_size:
                    image, future = self._pending.popleft()
                    if not future.done():  # else its caller has gone
                        batch.append((image, future))
                if not batch:
                    continue
                size = len(batch)
                try:
                    self.calls += 1
                    results = await asyncio.to_thread(
                        self.checker.scores, [image for image, _ in batch]
                    )
                    if len(results) != len(batch):
                        raise RuntimeError(f"checker gave {len(results)} results for {size}")
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException:
                    for _, future in batch:
                        future.cancel()
                    raise
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._running -= 1


@dataclass(frozen=True)
class SafetyPolicy:
    """Which labels count, from what score, and what to do with flagged outputs."""

    labels: frozenset[str]
    threshold: float = 0.5
    default_mode: str = "fast"
    withhold_flagged: bool = False

    def flagged_labels(self, scores: dict[str, float]) -> list[str]:
        """Counted labels (compared case-insensitively) at or above the threshold; a label
        the checker did not report scored 0, so a threshold of 0 flags every image."""
        counted = {label.casefold() for label in self.labels}
        by_name = {label.casefold(): score for label, score in scores.items()}
        return sorted(label for label in counted if by_name.get(label, 0.0) >= self.threshold)


class CheckerSafety:
    """ContentSafety backed by a real image checker and a prompt checker."""

    def __init__(
        self,
        runner: CheckerRunner,
        policy: SafetyPolicy,
        prompts: PromptChecker | None = None,
    ) -> None:
        self.runner = runner
        self.policy = policy
        self.prompts = prompts

    def validate(self, task: ImageInferenceIn) -> None:
        requested_mode(task, self.policy.default_mode)

    async def screen_input(
        self,
        task: ImageInferenceIn,
        references: Sequence[ReferenceImage],
        others: Sequence[tuple[str, Image.Image]] = (),
    ) -> None:
        if not wants_input_check(task):
            return
        mode = requested_mode(task, self.policy.default_mode)
        if self.prompts is not None:
            found = await asyncio.to_thread(self.prompts.findings, task.positivePrompt)
            if found:
                log.info("task %s: prompt blocked (%s)", task.taskUUID, ", ".join(found))
                raise ContentBlocked(
                    "positivePrompt was flagged by the content check (safety.blockContent); "
                    "the task was not run and is not charged.",
                    parameter="positivePrompt",
                )
        base = task.reference_parameter()
        named = [(f"{base}[{i}]", r.image) for i, r in enumerate(references)] + list(others)
        if not named:
            return
        verdicts = await self._flagged(task, [image for _, image in named], mode)
        for (parameter, _), labels in zip(named, verdicts, strict=True):
            if labels:
                log.info("task %s: %s blocked (%s)", task.taskUUID, parameter, ", ".join(labels))
                raise ContentBlocked(
                    f"{parameter} was flagged by the content check (safety.blockContent); "
                    "the task was not run and is not charged.",
                    parameter=parameter,
                )

    async def check_outputs(
        self, task: ImageInferenceIn, images: Sequence[Image.Image]
    ) -> list[OutputVerdict]:
        mode = requested_mode(task, self.policy.default_mode)
        if not wants_output_check(task) or mode == "none":
            return [OutputVerdict(nsfw=None) for _ in images]
        verdicts = []
        for labels in await self._flagged(task, images, mode):
            if labels:
                log.info("task %s: output flagged (%s)", task.taskUUID, ", ".join(labels))
            flagged = bool(labels)
            verdicts.append(
                OutputVerdict(nsfw=flagged, withhold=flagged and self.policy.withhold_flagged)
            )
        return verdicts

    async def _flagged(
        self, task: ImageInferenceIn, images: Sequence[Image.Image], mode: str
    ) -> list[list[str]]:
        """The counted labels each image is flagged for (empty: clean)."""
        size = self.runner.checker.input_size
        per_image = [views(image, mode, size) for image in images]
        flat = [view for group in per_image for view in group]
        try:
            scores = await self.runner.scores(flat)
        except Exception:
            log.exception("task %s: the content checker failed", task.taskUUID)
            raise InferenceError("The content check failed; nothing was delivered.") from None
        flagged: list[list[str]] = []
        start = 0
        for group in per_image:
            merged: dict[str, float] = {}
            for result in scores[start : start + len(group)]:
                for label, score in result.items():
                    merged[label] = max(merged.get(label, 0.0), score)
            start += len(group)
            flagged.append(self.policy.flagged_labels(merged))
        return flagged


# -- construction ----------------------------------------------------------------------------


def build_content_safety(settings: Settings) -> ContentSafety:
    """The ContentSafety that settings describe; loads the checker (slow: call off the loop).

    Anything that keeps checking from working is logged as a warning and gives an
    UnavailableSafety whose error items say why: checks fail closed, never silently pass.
    """
    spec = settings.safety_checker.strip()
    if spec.casefold() in ("none", ""):
        log.warning(
            "content checking is off (IMPASTO_SAFETY_CHECKER=none): tasks that ask for "
            "safety.checkContent, safety.blockContent or checkNSFW will fail"
        )
        return UnavailableSafety("it is turned off")
    try:
        checker = load_image_checker(
            spec, device=settings.safety_device, max_batch_size=settings.safety_batch_size
        )
    except CheckerUnavailable as exc:
        return _unavailable(f"checker {spec!r} cannot be used: {exc}")
    labels = frozenset(settings.safety_labels or checker.default_labels)
    known = {label.casefold() for label in checker.labels}
    unknown = sorted(label for label in labels if label.casefold() not in known)
    if not labels:
        return _unavailable(
            f"checker {checker.name} has no labels known to mean NSFW; set "
            f"IMPASTO_SAFETY_LABELS to those of its labels that count: "
            f"{', '.join(sorted(checker.labels))}"
        )
    if unknown:
        return _unavailable(
            f"IMPASTO_SAFETY_LABELS names labels checker {checker.name} does not give: "
            f"{', '.join(unknown)} (it gives: {', '.join(sorted(checker.labels))})"
        )
    terms = list(DEFAULT_PROMPT_TERMS if settings.safety_prompt_terms is None else [])
    terms += settings.safety_prompt_terms or []
    if settings.safety_prompt_terms_file is not None:
        try:
            terms += read_prompt_terms(settings.safety_prompt_terms_file)
        except OSError as exc:
            return _unavailable(f"IMPASTO_SAFETY_PROMPT_TERMS_FILE cannot be read: {exc}")
    policy = SafetyPolicy(
        labels=labels,
        threshold=settings.safety_threshold,
        default_mode=settings.safety_mode,
        withhold_flagged=settings.safety_withhold_flagged,
    )
    prompts = TermListPromptChecker(terms)
    log.info(
        "content checking with %s: labels %s at threshold %g, %d prompt terms, mode %s%s",
        checker.name,
        ", ".join(sorted(labels)),
        policy.threshold,
        len(prompts.terms),
        policy.default_mode,
        ", flagged outputs withheld" if policy.withhold_flagged else "",
    )
    return CheckerSafety(CheckerRunner(checker, settings.safety_threads), policy, prompts)


def _unavailable(reason: str) -> UnavailableSafety:
    log.warning(
        "content checking is unavailable: %s; tasks that ask for safety checks will fail", reason
    )
    # The client learns that checking is unavailable; the operator's log says why.
    return UnavailableSafety("the configured content checker could not be set up")


async def load_content_safety(settings: Settings) -> ContentSafety:
    """build_content_safety in a worker thread, for the runtime's start-up."""
    return await asyncio.to_thread(build_content_safety, settings)
