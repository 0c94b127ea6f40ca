"""The model registry: built-in AIRs, the operator's models file and aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from impasto.backends.registry import TINY_AIR, ModelRegistry, ModelsFileError
from impasto.protocol.errors import ModelNotFound
from impasto.protocol.rules import GENERATION_PARAMETERS, RUNWAY_SIZES


def load(tmp_path: Path, text: str) -> ModelRegistry:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return ModelRegistry.load(path)


# -- built-in entries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("air", "backend", "architecture"),
    [
        (TINY_AIR, "tiny", "sd1x"),
        ("runway:4@1", "runway", "runway-gen4-image"),
        ("runway:4@2", "runway", "runway-gen4-image"),
        ("runware:100@1", "diffusers", "flux1s"),
        ("runware:101@1", "diffusers", "flux1d"),
        ("civitai:101055@128078", "diffusers", "sdxl"),
    ],
)
def test_builtin_entry_resolves_to_itself_with_its_backend(
    air: str, backend: str, architecture: str
) -> None:
    resolved = ModelRegistry.load(None).resolve(air)
    assert resolved.requested is resolved.target
    assert resolved.target.air == air
    assert resolved.target.backend == backend
    assert resolved.target.architecture == architecture
    assert resolved.rules.air == air


def test_tiny_builtin_is_the_tiny_impasto_model_that_takes_generation_parameters() -> None:
    entry = ModelRegistry.load(None).resolve(TINY_AIR).target
    assert entry.air == "impasto:tiny@1"
    # An SD 1.x model takes every generation parameter but the SDXL refiner.
    assert entry.rules.parameters == GENERATION_PARAMETERS - {"refiner"}
    assert entry.rules.provider is None
    assert (entry.rules.sizes.min_side, entry.rules.sizes.max_side) == (64, 2048)
    assert entry.rules.sizes.allowed is None


@pytest.mark.parametrize("air", ["runway:4@1", "runway:4@2"])
def test_runway_builtins_take_exactly_the_sixteen_runway_sizes_and_no_generation_params(
    air: str,
) -> None:
    rules = ModelRegistry.load(None).resolve(air).rules
    assert rules.sizes.allowed == frozenset(RUNWAY_SIZES)
    assert len(rules.sizes.allowed) == 16
    assert rules.parameters == frozenset()
    assert rules.provider == "runway"
    assert rules.max_reference_images == 3


def test_runway_turbo_needs_a_reference_image_and_gen4_does_not() -> None:
    registry = ModelRegistry.load(None)
    assert registry.resolve("runway:4@1").rules.min_reference_images == 0
    assert registry.resolve("runway:4@2").rules.min_reference_images == 1


def test_runway_builtins_name_their_runway_model() -> None:
    registry = ModelRegistry.load(None)
    assert registry.resolve("runway:4@1").target.settings["model"] == "gen4_image"
    assert registry.resolve("runway:4@2").target.settings["model"] == "gen4_image_turbo"


def test_flux_builtins_point_at_their_hugging_face_repositories() -> None:
    registry = ModelRegistry.load(None)
    assert registry.resolve("runware:100@1").target.path == "black-forest-labs/FLUX.1-schnell"
    assert registry.resolve("runware:101@1").target.path == "black-forest-labs/FLUX.1-dev"
    assert "negativePrompt" not in registry.resolve("runware:101@1").rules.parameters


def test_unknown_model_raises_model_not_found_on_the_model_parameter() -> None:
    with pytest.raises(ModelNotFound) as caught:
        ModelRegistry.load(None).resolve("nobody:1@1")
    assert caught.value.code == "invalidModel"
    assert caught.value.parameter == "model"
    assert "nobody:1@1" in caught.value.message


def test_entries_are_listed_sorted_by_air_and_without_aliases() -> None:
    registry = ModelRegistry.load(None)
    airs = [entry.air for entry in registry.entries()]
    assert airs == sorted(airs)
    assert {TINY_AIR, "runway:4@1", "runway:4@2", "runware:100@1", "runware:101@1"} <= set(airs)
    assert registry.alias_of("runway:4@1") is None
    assert {"tiny", "runway", "diffusers"} <= registry.backend_kinds()


def test_loading_twice_gives_independent_registries(tmp_path: Path) -> None:
    aliased = load(tmp_path, '[aliases]\n"runway:4@1" = "impasto:tiny@1"\n')
    plain = ModelRegistry.load(None)
    assert aliased.resolve("runway:4@1").target.backend == "tiny"
    assert plain.resolve("runway:4@1").target.backend == "runway"


# -- models file: overrides and new entries ---------------------------------------------------


def test_models_file_overrides_a_builtin_field_by_field(tmp_path: Path) -> None:
    builtin = ModelRegistry.load(None).resolve(TINY_AIR).target
    registry = load(
        tmp_path,
        """
        [models."impasto:tiny@1"]
        name = "Tiny, renamed"
        max_results = 4
        max_side = 1024
        [models."impasto:tiny@1".settings]
        steps = 3
        """,
    )
    entry = registry.resolve(TINY_AIR).target
    assert entry.name == "Tiny, renamed"
    assert entry.rules.max_results == 4
    assert entry.rules.sizes.max_side == 1024
    assert entry.settings["steps"] == 3
    # Everything not named is kept as built in.
    assert entry.settings["guidance_scale"] == builtin.settings["guidance_scale"]
    assert entry.backend == builtin.backend
    assert entry.architecture == builtin.architecture
    assert entry.rules.sizes.min_side == builtin.rules.sizes.min_side
    assert entry.rules.sizes.default == builtin.rules.sizes.default
    assert entry.rules.parameters == builtin.rules.parameters
    assert entry.rules.max_reference_images == builtin.rules.max_reference_images
    assert entry.rules.price == builtin.rules.price


def test_models_file_can_replace_allowed_sizes_and_parameters(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        """
        [models."runware:101@1"]
        sizes = [[1024, 1024], [1344, 768]]
        default_width = 1344
        default_height = 768
        parameters = ["seed", "steps"]
        """,
    )
    rules = registry.resolve("runware:101@1").rules
    assert rules.sizes.allowed == frozenset({(1024, 1024), (1344, 768)})
    assert rules.sizes.default == (1344, 768)
    assert rules.parameters == frozenset({"seed", "steps"})
    assert rules.sizes.check((1024, 1024)) is None
    assert rules.sizes.check((512, 512)) is not None


def test_models_file_sizes_any_lifts_the_fixed_runway_sizes(tmp_path: Path) -> None:
    registry = load(tmp_path, '[models."runway:4@1"]\nsizes = "any"\n')
    rules = registry.resolve("runway:4@1").rules
    assert rules.sizes.allowed is None
    assert rules.sizes.check((512, 640)) is None


def test_models_file_adds_a_new_entry(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        """
        [models."my:sdxl@1"]
        name = "My SDXL"
        backend = "diffusers"
        path = "stabilityai/stable-diffusion-xl-base-1.0"
        architecture = "sdxl"
        default_width = 832
        default_height = 1216
        price_usd = 0.002
        parameters = ["seed", "negativePrompt", "steps", "CFGScale", "scheduler"]
        max_reference_images = 1
        [models."my:sdxl@1".settings]
        dtype = "float16"
        """,
    )
    entry = registry.resolve("my:sdxl@1").target
    assert (entry.air, entry.name, entry.backend) == ("my:sdxl@1", "My SDXL", "diffusers")
    assert entry.path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert entry.architecture == "sdxl"
    assert entry.settings == {"dtype": "float16"}
    assert entry.rules.air == "my:sdxl@1"
    assert entry.rules.sizes.default == (832, 1216)
    assert entry.rules.price.cost((832, 1216)) == pytest.approx(0.002)
    assert "negativePrompt" in entry.rules.parameters
    assert entry.rules.max_reference_images == 1
    # The built-ins are still there.
    assert registry.resolve("runway:4@1").target.backend == "runway"


def test_models_file_can_move_the_default_size_with_the_size_limits(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        """
        [models."impasto:tiny@1"]
        max_side = 256
        default_width = 256
        default_height = 128
        """,
    )
    sizes = registry.resolve(TINY_AIR).rules.sizes
    assert (sizes.max_side, sizes.default) == (256, (256, 128))


def test_new_entry_without_a_backend_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match=r"my:model@1.*needs a backend"):
        load(tmp_path, '[models."my:model@1"]\nname = "no backend"\n')


# -- aliases ----------------------------------------------------------------------------------


def test_alias_keeps_the_aliased_rules_and_price_but_runs_the_target_backend(
    tmp_path: Path,
) -> None:
    builtin = ModelRegistry.load(None).resolve("runway:4@1")
    registry = load(tmp_path, '[aliases]\n"runway:4@1" = "impasto:tiny@1"\n')
    resolved = registry.resolve("runway:4@1")
    assert resolved.target.air == TINY_AIR
    assert resolved.target.backend == "tiny"
    assert resolved.requested.air == "runway:4@1"
    assert resolved.rules == builtin.rules
    assert resolved.rules.sizes.allowed == frozenset(RUNWAY_SIZES)
    assert resolved.rules.price.cost((1920, 1080)) == pytest.approx(0.08)
    assert resolved.rules.provider == "runway"
    assert registry.alias_of("runway:4@1") == TINY_AIR
    # The target itself is unchanged.
    assert registry.resolve(TINY_AIR).target.air == TINY_AIR
    assert registry.resolve(TINY_AIR).rules.provider is None


def test_alias_of_a_new_air_takes_the_target_rules_under_its_own_name(tmp_path: Path) -> None:
    registry = load(tmp_path, '[aliases]\n"my:fast@1" = "impasto:tiny@1"\n')
    resolved = registry.resolve("my:fast@1")
    tiny_rules = registry.resolve(TINY_AIR).rules
    assert resolved.target.air == TINY_AIR
    assert resolved.rules.air == "my:fast@1"
    assert resolved.rules.sizes == tiny_rules.sizes
    assert resolved.rules.parameters == tiny_rules.parameters


def test_alias_can_target_a_model_defined_in_the_same_file(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        """
        [models."my:local@1"]
        backend = "diffusers"
        path = "some/repo"
        [aliases]
        "runway:4@2" = "my:local@1"
        """,
    )
    resolved = registry.resolve("runway:4@2")
    assert resolved.target.air == "my:local@1"
    assert resolved.rules.min_reference_images == 1


def test_alias_to_an_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match=r"runway:4@1.*unknown model.*nobody:1@1"):
        load(tmp_path, '[aliases]\n"runway:4@1" = "nobody:1@1"\n')


def test_alias_of_a_new_air_to_an_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match=r"my:new@1.*unknown model"):
        load(tmp_path, '[aliases]\n"my:new@1" = "nobody:1@1"\n')


@pytest.mark.parametrize(
    "aliases",
    [
        '"runway:4@1" = "impasto:tiny@1"\n"runway:4@2" = "runway:4@1"\n',
        '"runway:4@2" = "runway:4@1"\n"runway:4@1" = "impasto:tiny@1"\n',
        '"my:a@1" = "impasto:tiny@1"\n"my:b@1" = "my:a@1"\n',
        '"my:b@1" = "my:a@1"\n"my:a@1" = "impasto:tiny@1"\n',
    ],
    ids=["builtin-chain", "builtin-chain-reversed", "new-chain", "new-chain-reversed"],
)
def test_alias_chains_are_refused(tmp_path: Path, aliases: str) -> None:
    with pytest.raises(ModelsFileError, match="alias"):
        load(tmp_path, "[aliases]\n" + aliases)


def test_alias_with_a_bad_air_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match="'not an air' is not an AIR id"):
        load(tmp_path, '[aliases]\n"not an air" = "impasto:tiny@1"\n')


# -- malformed files --------------------------------------------------------------------------


def test_missing_models_file_is_a_models_file_error(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match="cannot read models file"):
        ModelRegistry.load(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."my:m@1"\nbackend = "tiny"\n', r"cannot read models file"),
        ('[models."my:m@1"]\nbackend = tiny\n', r"cannot read models file"),
        ('[modles."my:m@1"]\nbackend = "tiny"\n', r"unknown top-level tables \['modles'\]"),
        (
            '[models."impasto:tiny@1"]\ncolour = "red"\n',
            r"models\.'impasto:tiny@1': unknown keys \['colour'\]",
        ),
        ('[models."not an air"]\nbackend = "tiny"\n', r"'not an air' is not an AIR id"),
        ('[models."my:m"]\nbackend = "tiny"\n', r"'my:m' is not an AIR id"),
        ('[models."My:M@1"]\nbackend = "tiny"\n', r"'My:M@1' is not an AIR id"),
        ('[models]\n"my:m@1" = 5\n', r"models\.'my:m@1' must be a table"),
        (
            '[models."runway:4@1"]\nsize_prices = {"1024by1024" = 0.1}\n',
            r"models\.'runway:4@1': size '1024by1024' must look like 1024x768",
        ),
        (
            '[models."runway:4@1"]\nsize_prices = {"1024x" = 0.1}\n',
            r"models\.'runway:4@1': size '1024x' must look like 1024x768",
        ),
        ('[models."runway:4@1"]\nsizes = "big"\n', r"models\.'runway:4@1'"),
        ('[models."runway:4@1"]\nsizes = [[1024, 768, 3]]\n', r"models\.'runway:4@1'"),
        ('[models."runway:4@1"]\nsizes = [["wide", "tall"]]\n', r"models\.'runway:4@1'"),
        ('[models."impasto:tiny@1"]\nmax_results = "many"\n', r"models\.'impasto:tiny@1'"),
        ('[models."impasto:tiny@1"]\ndefault_width = "wide"\n', r"models\.'impasto:tiny@1'"),
        ('[models."impasto:tiny@1"]\nprice_usd = "free"\n', r"models\.'impasto:tiny@1'"),
        ('[models."impasto:tiny@1"]\nsettings = 5\n', r"models\.'impasto:tiny@1'"),
        (
            '[models."impasto:tiny@1"]\nparameters = ["seed", "hiresFix"]\n',
            r"models\.'impasto:tiny@1': parameters \['hiresFix'\] are not generation parameters",
        ),
        ("models = 5\n", r"models must be a table"),
        ('models = ["my:m@1"]\n', r"models must be a table"),
        ('aliases = ["runway:4@1"]\n', r"aliases must be a table"),
        ('aliases = "runway:4@1"\n', r"aliases must be a table"),
        (
            '[models."runway:4@1"]\ndefault_width = 500\n',
            r"models\.'runway:4@1': default size 500x1024",
        ),
        (
            '[models."impasto:tiny@1"]\nmax_side = 256\n',
            r"models\.'impasto:tiny@1': default size 512x512",
        ),
        (
            '[models."my:m@1"]\nbackend = "tiny"\nsizes = []\n',
            r"models\.'my:m@1': default size 1024x1024",
        ),
    ],
    ids=[
        "unclosed-table",
        "bare-value",
        "unknown-top-level-table",
        "unknown-entry-key",
        "air-with-spaces",
        "air-without-version",
        "air-upper-case-source",
        "entry-not-a-table",
        "size-price-key-not-a-size",
        "size-price-key-half-a-size",
        "sizes-a-string",
        "sizes-triple",
        "sizes-not-numbers",
        "max-results-not-a-number",
        "default-width-not-a-number",
        "price-not-a-number",
        "settings-not-a-table",
        "parameter-not-a-generation-parameter",
        "models-a-number",
        "models-a-list",
        "aliases-a-list",
        "aliases-a-string",
        "default-size-not-an-allowed-pair",
        "default-size-over-max-side",
        "no-allowed-sizes",
    ],
)
def test_malformed_models_file_is_refused_with_a_message_naming_the_entry(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ModelsFileError, match=message):
        load(tmp_path, text)
