"""The models every impasto server knows without a models file: the tiny model, its assets
and the tiny FLUX (built in code, for tests and offline first runs), Runway Gen-4 Image,
FLUX.1, SDXL and SD-Turbo."""

from __future__ import annotations

from typing import Any

from impasto.backends.entries import TINY_AIR, ModelEntry, any_size
from impasto.backends.utility.catalog import utility_entries
from impasto.protocol.rules import (
    GENERATION_PARAMETERS,
    RUNWAY_720P_SIZES,
    RUNWAY_SIZES,
    ModelRules,
    PriceTable,
    SizeRule,
)


def builtin_entries() -> list[ModelEntry]:
    runway_sizes = SizeRule(default=(1024, 1024), allowed=frozenset(RUNWAY_SIZES))
    runway_prices = PriceTable(per_image=0.08, by_size=dict.fromkeys(RUNWAY_720P_SIZES, 0.05))
    local = frozenset(GENERATION_PARAMETERS) - {"refiner"}
    xl = frozenset(GENERATION_PARAMETERS)
    flux = frozenset(
        {"seed", "steps", "CFGScale", "scheduler", "strength", "seedImage", "maskImage"}
        | {"maskMargin", "outpaint", "lora", "acceleratorOptions"}
    )
    tiny = {"steps": 2, "guidance_scale": 2.0}
    return [
        *_tiny_assets(),
        *utility_entries(),
        ModelEntry(
            air="impasto:tiny-inpaint@1",
            name="impasto tiny inpainting checkpoint (9-channel UNet, random weights)",
            architecture="sd1x",
            backend="tiny",
            type="inpainting",
            rules=ModelRules(
                air="impasto:tiny-inpaint@1",
                sizes=any_size((512, 512)),
                parameters=local,
                required=frozenset({"maskImage"}),
            ),
            settings={**tiny, "asset": "inpaint"},
        ),
        ModelEntry(
            air="impasto:tiny-xl@1",
            name="impasto tiny SDXL (two text encoders, random weights; refiner: tiny-xl-refiner)",
            architecture="sdxl",
            backend="tiny",
            rules=ModelRules(
                air="impasto:tiny-xl@1",
                sizes=any_size((512, 512)),
                parameters=xl - {"controlNet", "ipAdapters", "embeddings"},
                max_reference_images=1,
            ),
            settings={**tiny, "asset": "xl"},
        ),
        ModelEntry(
            air=TINY_AIR,
            name="impasto tiny (random weights, for tests and offline first runs)",
            architecture="sd1x",
            backend="tiny",
            rules=ModelRules(
                air=TINY_AIR,
                sizes=any_size((512, 512)),
                parameters=local,
                max_reference_images=3,
            ),
            settings={"steps": 2, "guidance_scale": 2.0},
        ),
        ModelEntry(
            air="impasto:tiny-flux@1",
            name="impasto tiny FLUX.1 (T5 and CLIP text encoders, DiT, random weights)",
            architecture="flux1s",
            backend="tiny",
            rules=ModelRules(
                air="impasto:tiny-flux@1",
                sizes=any_size((512, 512)),
                parameters=flux,
                max_reference_images=1,
            ),
            # FLUX packs 2x2 latents: sizes are multiples of twice the VAE's 8x.
            settings={
                "steps": 4,
                "guidance_scale": 0.0,
                "size_multiple_factor": 2,
                "asset": "flux",
            },
        ),
        ModelEntry(
            air="impasto:tiny-ip@1",
            name="impasto tiny with a tiny IP-Adapter (reference images as image prompts)",
            architecture="sd1x",
            backend="tiny",
            rules=ModelRules(
                air="impasto:tiny-ip@1",
                sizes=any_size((512, 512)),
                # Its configured adapter takes the reference image; no per-request ones.
                parameters=local - {"strength", "ipAdapters"},
                max_reference_images=1,
            ),
            settings={
                "steps": 2,
                "guidance_scale": 2.0,
                "ip_adapter": {
                    "path": "impasto-tiny-ip-adapter",
                    "subfolder": "models",
                    "weight_name": "ip-adapter_tiny.safetensors",
                    "scale": 0.6,
                },
            },
        ),
        ModelEntry(
            air="runway:4@1",
            name="Runway Gen-4 Image",
            architecture="runway-gen4-image",
            backend="runway",
            rules=ModelRules(
                air="runway:4@1",
                sizes=runway_sizes,
                max_reference_images=3,
                provider="runway",
                price=runway_prices,
            ),
            settings={"model": "gen4_image"},
        ),
        ModelEntry(
            air="runway:4@2",
            name="Runway Gen-4 Image Turbo",
            architecture="runway-gen4-image",
            backend="runway",
            rules=ModelRules(
                air="runway:4@2",
                sizes=runway_sizes,
                min_reference_images=1,
                max_reference_images=3,
                provider="runway",
                price=PriceTable(per_image=0.02),
            ),
            settings={"model": "gen4_image_turbo"},
        ),
        ModelEntry(
            air="runware:100@1",
            name="FLUX.1 [schnell]",
            architecture="flux1s",
            backend="diffusers",
            path="black-forest-labs/FLUX.1-schnell",
            rules=ModelRules(
                air="runware:100@1",
                sizes=any_size((1024, 1024)),
                parameters=flux,
                max_reference_images=1,
            ),
            settings={"dtype": "bfloat16", "steps": 4, "guidance_scale": 0.0},
        ),
        ModelEntry(
            air="runware:101@1",
            name="FLUX.1 [dev]",
            architecture="flux1d",
            backend="diffusers",
            path="black-forest-labs/FLUX.1-dev",
            rules=ModelRules(
                air="runware:101@1",
                sizes=any_size((1024, 1024)),
                parameters=flux,
                max_reference_images=1,
            ),
            settings={"dtype": "bfloat16", "steps": 28, "guidance_scale": 3.5},
        ),
        ModelEntry(
            air="civitai:101055@128078",
            name="Stable Diffusion XL 1.0",
            architecture="sdxl",
            backend="diffusers",
            path="stabilityai/stable-diffusion-xl-base-1.0",
            rules=ModelRules(
                air="civitai:101055@128078",
                sizes=any_size((1024, 1024)),
                parameters=xl,
                max_reference_images=1,
            ),
            settings={"dtype": "float16", "variant": "fp16", "steps": 30, "guidance_scale": 7.0},
        ),
        ModelEntry(
            air="impasto:sd-turbo@1",
            name="SD-Turbo (runs acceptably on a CPU)",
            architecture="sd2x",
            backend="diffusers",
            path="stabilityai/sd-turbo",
            rules=ModelRules(
                air="impasto:sd-turbo@1",
                sizes=any_size((512, 512), 1024),
                parameters=local,
                max_reference_images=1,
            ),
            settings={"steps": 1, "guidance_scale": 0.0},
        ),
    ]


def _tiny_assets() -> list[ModelEntry]:
    """The tiny model's LoRAs, ControlNet, VAE, embedding and IP-Adapter, built in code."""

    def asset(air: str, name: str, category: str, asset: str, **settings: Any) -> ModelEntry:
        return ModelEntry(
            air=air,
            name=name,
            architecture="sd1x",
            backend="tiny",
            category=category,
            rules=ModelRules(air=air, sizes=any_size((512, 512))),
            settings={"asset": asset, **settings},
        )

    return [
        asset("impasto:tiny-lora@1", "impasto tiny LoRA one (random)", "lora", "lora1"),
        asset("impasto:tiny-lora@2", "impasto tiny LoRA two (random)", "lora", "lora2"),
        asset("impasto:tiny-controlnet@1", "impasto tiny ControlNet", "controlnet", "controlnet"),
        asset("impasto:tiny-vae@1", "impasto tiny VAE (other random weights)", "vae", "vae"),
        asset(
            "impasto:tiny-embedding@1",
            "impasto tiny textual inversion",
            "embeddings",
            "embedding",
            token="<impasto-tiny>",
        ),
        asset(
            "impasto:tiny-ip-adapter@1",
            "impasto tiny IP-Adapter",
            "ipadapter",
            "ip-adapter",
            subfolder="models",
            weight_name="ip-adapter_tiny.safetensors",
        ),
        ModelEntry(
            air="impasto:tiny-xl-refiner@1",
            name="impasto tiny SDXL refiner",
            architecture="sdxl",
            backend="tiny",
            type="refiner",
            rules=ModelRules(air="impasto:tiny-xl-refiner@1", sizes=any_size((512, 512))),
            settings={"asset": "xl-refiner"},
        ),
    ]
