"""Wire types of the utility tasks beyond imageUpload: `mediaStorage` (upload or delete a
client image) and ControlNet preprocessing under both of its names, and the result items they
answer with.

- `mediaStorage` is what runware-sdk 1.8 `media_storage`, runware 0.5.24 `uploadMedia` and
  @runware/sdk-js `mediaStorage` send instead of imageUpload: `operation` "upload" with `media`
  (URL, data URI or raw base64), or "delete" with the UUID of an uploaded image.
- `imageControlNetPreProcess` is the legacy name (@runware/sdk-js 1.3.2 `controlNetPreProcess`):
  flat `inputImage`, `preProcessorType`, `width`, `height` and the Canny thresholds.
  `controlNetPreprocess` is the new one (runware-sdk 1.8 task_map): the preprocessor as a model
  AIR such as `runware:controlnet-preprocess@canny`, the image in `inputs.image`, the thresholds
  in `settings`. compat: Runware's own controlnet-preprocess page still shows the new taskType
  with the flat fields, so it takes either form (not a mix; the service checks which).

Which field a form needs is checked by the service, not here: every field is optional in the
schema, so the published JSON schema stays something a fuzzer can draw tasks from.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from impasto.protocol.fields import (
    INTEGRAL,
    MAX_TTL_S,
    OUTPUT_FORMAT_PATTERN,
    UUID4,
    ImageString,
    Name,
    OutputType,
    output_format,
    single_output_type,
)

# What impasto runs without model weights (see service/guides.py); `tile` is the group name
# Runware's preprocessor list gives the Gaussian-pyramid tile preprocessor.
PREPROCESSORS = ("canny", "tile_gaussian", "tile", "shuffle", "lineart_standard", "scribble_xdog")
# Names Runware's SDKs list whose algorithms need a trained network (depth estimators, pose
# detectors, segmenters, HED/PiDiNet edges, learned line art): refused as unsupported.
WEIGHTED_PREPROCESSORS = frozenset(
    {
        "depth",
        "depth_leres",
        "depth_midas",
        "depth_zoe",
        "mlsd",
        "normalbae",
        "normal_bae",
        "openpose",
        "openpose_face",
        "openpose_faceonly",
        "openpose_full",
        "openpose_hand",
        "seg",
        "seg_ofade20k",
        "seg_ofcoco",
        "seg_ufade20k",
        "lineart",
        "lineart_anime",
        "lineart_coarse",
        "lineart_realistic",
        "scribble",
        "scribble_hed",
        "scribble_pidinet",
        "softedge",
        "softedge_hed",
        "softedge_hedsafe",
        "softedge_pidinet",
        "softedge_pidisafe",
        "inpaint_global_harmonious",
    }
)
# The new form names a preprocessor `<PREPROCESSOR_AIR_PREFIX><name>`, with `-` for `_`
# (`runware:controlnet-preprocess@lineart-anime` is lineart_anime).
PREPROCESSOR_AIR_PREFIX = "runware:controlnet-preprocess@"
PREPROCESSOR_AIRS = tuple(
    PREPROCESSOR_AIR_PREFIX + name.replace("_", "-") for name in PREPROCESSORS
)

DEFAULT_LOW_THRESHOLD = 100
DEFAULT_HIGH_THRESHOLD = 200


class UtilityModel(BaseModel):
    # The same rules as tasks.WireModel (which imports this module, so it cannot be the base).
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


OutputTypeField = Annotated[
    OutputType,
    BeforeValidator(
        single_output_type,
        json_schema_input_type=OutputType
        | Annotated[list[OutputType], Field(min_length=1, max_length=1)],
    ),
]
OutputFormatField = Annotated[
    Literal["JPG", "PNG", "WEBP"],
    BeforeValidator(output_format),
    WithJsonSchema({"type": "string", "pattern": OUTPUT_FORMAT_PATTERN, "default": "JPG"}),
]
Quality = Annotated[int, Field(ge=20, le=99), INTEGRAL]
Ttl = Annotated[int, Field(ge=60, le=MAX_TTL_S), INTEGRAL]
# The guide image's size: past 4096 a guide is larger than any pipeline takes.
MAX_GUIDE_SIDE = 4096
GuideSide = Annotated[int, Field(ge=8, le=MAX_GUIDE_SIDE), INTEGRAL]
# Canny thresholds on the 8-bit gradient scale, as in ControlNet's annotators (cv2.Canny).
Threshold = Annotated[int, Field(ge=0, le=255), INTEGRAL]
# Any name is taken (an unknown one gets an error listing the supported ones); the schema
# offers the ones that run.
PreprocessorName = Annotated[
    Name,
    Field(min_length=1, max_length=64),
    WithJsonSchema({"type": "string", "enum": list(PREPROCESSORS)}),
]
PreprocessorAIR = Annotated[
    Name,
    Field(min_length=1, max_length=200),
    WithJsonSchema({"type": "string", "enum": list(PREPROCESSOR_AIRS)}),
]


class MediaStorageIn(UtilityModel):
    taskType: Literal["mediaStorage"]
    taskUUID: UUID4
    operation: Literal["upload", "delete"]
    # upload: the image (URL, data URI or raw base64); delete: may carry the UUID instead of
    # mediaUUID (runware-sdk 1.8 types the request as {operation, media} only).
    media: ImageString | None = None
    mediaUUID: UUID4 | None = None


class PreprocessInputsIn(UtilityModel):
    image: ImageString


class PreprocessSettingsIn(UtilityModel):
    lowThresholdCanny: Threshold | None = None
    highThresholdCanny: Threshold | None = None
    includeHandsAndFaceOpenPose: bool | None = None


class ImageControlNetPreProcessIn(UtilityModel):
    taskType: Literal["imageControlNetPreProcess"]
    taskUUID: UUID4
    inputImage: ImageString
    preProcessorType: PreprocessorName
    width: GuideSide | None = None
    height: GuideSide | None = None
    lowThresholdCanny: Threshold | None = None
    highThresholdCanny: Threshold | None = None
    includeHandsAndFaceOpenPose: bool | None = None
    outputType: OutputTypeField = "URL"
    outputFormat: OutputFormatField = "JPG"
    outputQuality: Quality = 95
    ttl: Ttl | None = None
    includeCost: bool = False
    # compat: @runware/sdk-js sends "async" for this task and polls getResponse.
    deliveryMethod: Literal["sync", "async"] = "sync"


class ControlNetPreprocessIn(UtilityModel):
    taskType: Literal["controlNetPreprocess"]
    taskUUID: UUID4
    model: PreprocessorAIR | None = None
    inputs: PreprocessInputsIn | None = None
    settings: PreprocessSettingsIn | None = None
    # compat: the flat form of the legacy task, which Runware's docs show under this name too.
    inputImage: ImageString | None = None
    preProcessorType: PreprocessorName | None = None
    lowThresholdCanny: Threshold | None = None
    highThresholdCanny: Threshold | None = None
    includeHandsAndFaceOpenPose: bool | None = None
    width: GuideSide | None = None
    height: GuideSide | None = None
    outputType: OutputTypeField = "URL"
    outputFormat: OutputFormatField = "JPG"
    outputQuality: Quality = 95
    ttl: Ttl | None = None
    includeCost: bool = False
    deliveryMethod: Literal["sync", "async"] = "sync"


PreprocessIn = ImageControlNetPreProcessIn | ControlNetPreprocessIn


def media_upload_item(task_uuid: str, media_uuid: str, media_url: str) -> dict[str, Any]:
    """The answer to a mediaStorage upload: both fields, as for imageUpload."""
    return {
        "taskType": "mediaStorage",
        "taskUUID": task_uuid,
        "operation": "upload",
        "mediaUUID": media_uuid,
        "mediaURL": media_url,
    }


def media_delete_item(task_uuid: str, media_uuid: str) -> dict[str, Any]:
    return {
        "taskType": "mediaStorage",
        "taskUUID": task_uuid,
        "operation": "delete",
        "mediaUUID": media_uuid,
    }


def guide_image_item(
    *,
    task_type: str,
    task_uuid: str,
    guide_uuid: str,
    input_uuid: str,
    output_type: str,
    data: bytes,
    content_type: str,
    url: str,
    cost: float | None = None,
) -> dict[str, Any]:
    """A preprocessing result: the guide image in the field `outputType` names
    (guideImageURL, guideImageBase64Data or guideImageDataURI) and the stored input's UUID."""
    item: dict[str, Any] = {
        "taskType": task_type,
        "taskUUID": task_uuid,
        "guideImageUUID": guide_uuid,
        "inputImageUUID": input_uuid,
    }
    if output_type == "base64Data":
        item["guideImageBase64Data"] = base64.b64encode(data).decode("ascii")
    elif output_type == "dataURI":
        encoded = base64.b64encode(data).decode("ascii")
        item["guideImageDataURI"] = f"data:{content_type};base64,{encoded}"
    else:
        item["guideImageURL"] = url
    if cost is not None:
        item["cost"] = round(cost, 6)
    return item
