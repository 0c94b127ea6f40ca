"""The syntax of weighted prompts: Runware's `promptWeighting` read into compel's prompt objects.

- "compel": compel's syntax, `(word)1.2`, `word++`, `word--`, `("a", "b").and()`, `.blend()`,
  read by compel's own parser. Refused here: a parenthesis that is not balanced (compel would
  read it as text; a literal one is `\\(`), nesting deeper than MAX_NESTING, `withLora()` and
  `useLora()`, and `.swap()`.
- "sdEmbeds": the A1111 syntax, `(word:1.3)`, `(word)` = x1.1, `[word]` = /1.1, nesting
  multiplies, `\\(` is a literal parenthesis and `BREAK` starts a new 77-token chunk. compel has
  no parser for it: `parse_sd_embeds` reads it (A1111's algorithm) into weighted runs of text,
  which become compel's prompt objects directly, so no text has to survive a second parse.

Malformed syntax raises PromptSyntaxError, which names the prompt it is in. `check_prompt_syntax`
needs no model, so that the server can refuse a malformed prompt before it accepts a task;
encoding the parsed prompts is `prompting`'s job.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

# compel's parser is a pyparsing grammar; deeper nesting than this is refused (see _parse_compel).
MAX_NESTING = 20


class PromptSyntaxError(ValueError):
    """A prompt's weighting syntax is malformed; `parameter` is "positivePrompt" or
    "negativePrompt", the prompt it is in."""

    def __init__(self, message: str, parameter: str = "positivePrompt") -> None:
        super().__init__(message)
        self.parameter = parameter


# -- the A1111 ("sdEmbeds") syntax ----------------------------------------------------------------

# A1111's attention grammar (modules/prompt_parser.py), token by token.
_SD_EMBEDS_TOKEN = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|    # escapes; a lone backslash is dropped, as in A1111
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|        # ':1.3)' closes a round bracket with its weight
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_ROUND = 1.1
_SQUARE = 1 / 1.1


def parse_sd_embeds(text: str) -> list[list[tuple[str, float]]]:
    """A1111 ("sdEmbeds") prompt syntax as runs of (text, weight), one list per chunk.

    `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by w,
    and nesting multiplies; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal. As in A1111, a
    bracket left open applies to the end of the prompt, a closing one that closes nothing is
    text, and neighbouring runs of equal weight are joined. `BREAK` ends a chunk (A1111 pads the
    chunk to 75 tokens and starts another); unlike A1111, it does so inside brackets too, where
    A1111 would read it as the word BREAK with a negative weight. Raises PromptSyntaxError for a
    weight that is not a number, such as `(x:1.2.3)`.
    """
    runs: list[tuple[str, float] | None] = []  # None: a BREAK
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for index in range(start, len(runs)):
            run = runs[index]
            if run is not None:
                runs[index] = (run[0], run[1] * factor)

    for match in _SD_EMBEDS_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append((token[1:], 1.0))
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise PromptSyntaxError(
                    f"{weight!r} in {token.strip()!r} is not a number; write a weight as "
                    "(text:1.3)."
                ) from None
            multiply(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), _SQUARE)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    runs.append(None)
                runs.append((part, 1.0))
    for start in round_open:
        multiply(start, _ROUND)
    for start in square_open:
        multiply(start, _SQUARE)

    chunks: list[list[tuple[str, float]]] = [[]]
    for run in runs:
        if run is None:
            chunks.append([])
        elif chunks[-1] and chunks[-1][-1][1] == run[1]:
            chunks[-1][-1] = (chunks[-1][-1][0] + run[0], run[1])
        else:
            chunks[-1].append(run)
    kept = [[run for run in chunk if run[0]] for chunk in chunks]
    return [chunk for chunk in kept if chunk] or [[]]


# -- parsing into compel's prompt objects -------------------------------------------------------


def _sd_embeds_conjunction(text: str, parameter: str) -> Any:
    from compel.prompt_parser import (  # type: ignore[import-untyped]
        Conjunction,
        FlattenedPrompt,
    )

    try:
        chunks = parse_sd_embeds(text)
    except PromptSyntaxError as exc:
        raise PromptSyntaxError(str(exc), parameter) from None
    # Blank runs tokenize to nothing, and compel cannot down-weight a fragment without tokens.
    prompts = [
        FlattenedPrompt([(run_text, weight) for run_text, weight in chunk if run_text.strip()])
        for chunk in chunks
    ]
    prompts = [prompt if prompt.children else FlattenedPrompt([("", 1.0)]) for prompt in prompts]
    # Parts of a Conjunction are encoded apart and joined along the tokens: A1111's BREAK.
    return Conjunction(prompts, [1.0] * len(prompts))


def _check_parentheses(text: str, parameter: str) -> None:
    # compel reads an unbalanced parenthesis as literal text, which a user who asked for
    # weighting has hardly meant; a literal one is written \( or \).
    opened: list[int] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "(":
            opened.append(index)
            if len(opened) > MAX_NESTING:
                raise PromptSyntaxError(
                    f"Parentheses are nested more than {MAX_NESTING} deep.", parameter
                )
        elif char == ")":
            if not opened:
                raise PromptSyntaxError(
                    f"')' at character {index + 1} closes no '('; write a literal one as \\).",
                    parameter,
                )
            opened.pop()
        index += 1
    if opened:
        raise PromptSyntaxError(
            f"'(' at character {opened[-1] + 1} is never closed; write a literal one as \\(.",
            parameter,
        )


def _parse_compel(text: str, parameter: str) -> Any:
    import pyparsing
    from compel import Compel  # type: ignore[import-untyped]
    from compel.prompt_parser import PromptParser

    _check_parentheses(text, parameter)
    # Without memoization compel's grammar backtracks exponentially: about four times longer
    # for each level of nested parentheses (12 levels: 40 s on a CPU). The switch is
    # process-wide and idempotent; it only caches, and fails only against left recursion.
    with contextlib.suppress(RuntimeError):
        pyparsing.ParserElement.enable_packrat()
    try:
        conjunction = Compel.parse_prompt_string(text)
    except (
        pyparsing.ParseBaseException,
        PromptParser.ParsingException,
        ValueError,
        IndexError,
        RecursionError,
    ) as exc:
        raise PromptSyntaxError(
            f"The prompt's compel syntax is malformed: {exc}", parameter
        ) from None
    if conjunction.lora_weights:
        raise PromptSyntaxError(
            "withLora() and useLora() are not applied from prompts; give LoRAs in `lora`.",
            parameter,
        )
    if any(part.wants_cross_attention_control for part in conjunction.prompts):
        raise PromptSyntaxError(
            ".swap() (cross-attention control) is not supported with prompt embeddings.",
            parameter,
        )
    return conjunction


def check_prompt_syntax(text: str, weighting: str, parameter: str = "positivePrompt") -> None:
    """Raise PromptSyntaxError if `text` is malformed in `weighting`'s syntax (no model needed:
    the server checks this before it accepts a task)."""
    _parse(text, weighting, parameter)


def _parse(text: str, weighting: str, parameter: str) -> Any:
    if weighting == "compel":
        return _parse_compel(text, parameter)
    return _sd_embeds_conjunction(text, parameter)
