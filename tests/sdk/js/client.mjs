// A client of impasto written with the official @runware/sdk-js 1.3.2, used unchanged (Node 20):
//
//     node tests/sdk/js/client.mjs URL SCENARIO [ARGS_JSON]
//
// URL is the WebSocket address (ws://host:port/v1; the SDK adds ?sdk=js&version=1.3.2 itself).
// It prints one JSON object per line: {"event": ...} as things happen, then {"result": ...} or
// {"error": ...}, and exits. IMPASTO_SDK_JS_LOG=1 turns on the SDK's own logging (to stdout).
//
// Scenarios:
//   generate          imageInference() each task of ARGS.tasks in turn; result: the image lists
//   upload_reference  imageUpload(ARGS.image), then imageInference() with the uploaded imageUUID
//                     as the SDK's own top-level referenceImages, and again as
//                     inputs.referenceImages; result: the upload reply and both image lists
//   utilities         mediaStorage() upload of ARGS.media, controlNetPreProcess() (canny, the SDK's
//                     default async delivery: ack, then getResponse polls) of the mediaUUID, and
//                     mediaStorage() delete of it; result: the three replies
//   async             imageInference() with deliveryMethod "async" (the ack), getResponse() once,
//                     then the SDK's pollForAsyncResults() until the images are done
//   invalid           imageInference() ARGS.task, expecting a rejection; result: the rejection
//   drop              imageInference() ARGS.task with onPartialImages events, while the test cuts
//                     the connection; ARGS.timeoutDuration bounds each wait for images

import { pathToFileURL } from "node:url";

import { RunwareServer } from "@runware/sdk-js";

const MODEL = "impasto:tiny@1";

export function emit(fields) {
  process.stdout.write(JSON.stringify(fields) + "\n");
}

function request(fields) {
  return {
    model: MODEL,
    positivePrompt: "a lighthouse at dusk",
    width: 64,
    height: 64,
    ...fields,
  };
}

async function scenario(rw, name, args) {
  if (name === "generate") {
    const results = [];
    for (const fields of args.tasks) {
      results.push(await rw.imageInference(request(fields)));
    }
    return results;
  }
  if (name === "upload_reference") {
    const upload = await rw.imageUpload({ image: args.image });
    const topLevel = await rw.imageInference(
      request({ ...args.task, referenceImages: [upload.imageUUID] }),
    );
    const nested = await rw.imageInference(
      request({ ...args.task, inputs: { referenceImages: [upload.imageUUID] } }),
    );
    return { upload, topLevel, nested };
  }
  if (name === "utilities") {
    const media = await rw.mediaStorage({ media: args.media });
    const guide = await rw.controlNetPreProcess({
      inputImage: media.mediaUUID,
      preProcessorType: "canny",
      outputType: "base64Data",
      outputFormat: "PNG",
      includeCost: true,
    });
    const deleted = await rw.mediaStorage({ media: media.mediaUUID, operation: "delete" });
    return { media, guide, deleted };
  }
  if (name === "async") {
    const ack = await rw.imageInference(request({ ...args.task, deliveryMethod: "async" }));
    const taskUUID = ack[0].taskUUID;
    const first = await rw.getResponse({ taskUUID });
    const images = await rw.pollForAsyncResults({
      taskUUID,
      numberResults: args.task.numberResults ?? 1,
    });
    return { ack, first, images };
  }
  if (name === "invalid") {
    try {
      const images = await rw.imageInference(request(args.task));
      throw new Error(`no error; images ${JSON.stringify(images)}`);
    } catch (rejection) {
      if (rejection instanceof Error) throw rejection;
      return rejection;
    }
  }
  if (name === "drop") {
    const images = await rw.imageInference(
      request({
        ...args.task,
        onPartialImages: (partial, error) =>
          emit({
            event: "partial",
            images: (partial ?? []).map((image) => image.imageUUID),
            error: error ?? null,
          }),
      }),
    );
    return { images };
  }
  throw new Error(`unknown scenario ${name}`);
}

// Runs `run(rw, name, args)` for the command line's URL SCENARIO [ARGS_JSON] and prints the
// result or the error (utility_client.mjs shares it).
export async function runClient(run) {
  const [url, name, rawArgs] = process.argv.slice(2);
  const args = rawArgs ? JSON.parse(rawArgs) : {};
  const rw = new RunwareServer({
    apiKey: "k",
    url,
    ...(args.timeoutDuration ? { timeoutDuration: args.timeoutDuration } : {}),
    enableLogging: Boolean(process.env.IMPASTO_SDK_JS_LOG),
  });
  try {
    await rw.ensureConnection();
    emit({ event: "connected" });
    emit({ result: await run(rw, name, args) });
  } catch (failure) {
    const error = failure instanceof Error ? { message: failure.message } : failure;
    emit({ error });
    process.exitCode = 1;
  } finally {
    await rw.disconnect();
  }
  // The SDK keeps timers (heartbeat, reconnect) that would hold the process open.
  process.exit();
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  runClient(scenario);
}
