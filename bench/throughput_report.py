"""What bench/gpu_throughput.py prints: the targets each result is held to (on a GPU with the
full architectures), the table, and the notes under it (what each server did with the speed
options, what did not run and why, the published references).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bench.harness import table_lines
from bench.throughput_runs import MODES, ModeResult, VariantRun

# Published numbers to read ours against (other servers, other GPUs): printed as a footer.
REFERENCES = {
    "sdxl": "SDXL 30 steps 1024x1024: 1.47 s/image (TensorRT, H100)",
    "flux": "FLUX.1-schnell 1024x1024: 0.85 s/prediction (Cog, H100, compiled)",
    "flux-dev": "FLUX.1-dev 1024x1024: 3.50 s/image lossless (SGLang, H200)",
}


def apply_targets(results: list[ModeResult], baseline: ModeResult, on_gpu: bool) -> None:
    """The targets (one GPU, bf16), for the full architectures on a GPU: a single request
    within 3 % of the plain call; sustained under 8 clients, SDXL 30 steps <= 0.8 s/image
    (and issue 7's >= 2.5x plain), FLUX.1-schnell <= 0.5 s/image. FLUX.1-dev has a reference
    (the footer), no target."""
    for result in results:
        if not on_gpu or result.mode == MODES[0]:
            continue
        if result.clients == 1:
            result.target = "p50 <= 1.03x plain"
            result.meets_target = result.p50_s <= 1.03 * baseline.p50_s
        elif result.arch == "sdxl":
            result.target = "<= 0.8 s/img and >= 2.5x plain"
            result.meets_target = (
                1 / result.images_per_s <= 0.8
                and result.images_per_s >= 2.5 * baseline.images_per_s
            )
        elif result.arch == "flux":
            result.target = "<= 0.5 s/img"
            result.meets_target = 1 / result.images_per_s <= 0.5


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    columns = [
        ("arch", "arch", "{}"),
        ("variant", "variant", "{}"),
        ("mode", "mode", "{}"),
        ("images", "images", "{}"),
        ("images_per_s", "img/s", "{:.3f}"),
        ("s_per_image", "s/img", "{:.3f}"),
        ("p50_s", "p50 s", "{:.3f}"),
        ("ratio_images_per_s", "img/s vs plain", "{:.2f}x"),
        ("ratio_p50", "p50 vs plain", "{:.2f}x"),
        ("cold_start_s", "cold start s", "{:.1f}"),
        ("lossy", "lossy", "{}"),
        ("target", "target", "{}"),
        ("meets_target", "met", "{}"),
    ]

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if key == "meets_target":
            return "-" if value is None else ("yes" if value else "NO")
        if key == "lossy":
            return "lossy" if value else "-"
        return "-" if value in (None, "") else fmt.format(value)

    table = [[title for _, title, _ in columns]]
    table += [[cell(row, key, fmt) for key, _, fmt in columns] for row in rows]
    print(header)
    for line in table_lines(table):
        print(line.rstrip())


def print_notes(runs: list[VariantRun], arches: Iterable[str], on_gpu: bool) -> None:
    """Under the table: what each server did with the options, the variants that did not run,
    and the published references."""
    reported = [run for run in runs if run.server is not None]
    if reported:
        print("\nspeed options, as the server logged them:")
        for run in reported:
            assert run.server is not None
            applied = ", ".join(run.server.applied) or "none"
            print(f"  {run.arch}  {run.variant.name}: applied {applied}")
            for key in run.variant.requested:
                print(f"  {run.arch}  {run.variant.name}: {key} {run.server.status(key)}")
    for status, title in (("skipped", "skipped"), ("failed", "FAILED")):
        chosen = [run for run in runs if run.status == status]
        if chosen:
            print(f"\n{title}:")
            for run in chosen:
                print(f"  {run.arch}  {run.variant.name}: {run.reason}")
    print("\nreferences (published, other servers and GPUs):")
    for arch in arches:
        if arch in REFERENCES:
            print(f"  {REFERENCES[arch]}")
    if not on_gpu:
        print("  (this run is not on a GPU with the full architectures: no targets apply)")
