// A client of impasto's utility tasks written with the official @runware/sdk-js 1.3.2, used
// unchanged (Node 20), through the SDK's own methods for each task type:
//
//     node tests/sdk/js/utility_client.mjs URL SCENARIO [ARGS_JSON]
//
// URL is the WebSocket address (ws://host:port/v1). Like client.mjs it prints one JSON object per
// line: {"event": ...} as things happen, then {"result": ...} or {"error": ...}, and exits.
//
// Scenarios:
//   upscale, removeBackground, caption, enhancePrompt: each entry {method, params} of ARGS.calls
//   in turn, `method` one of the SDK's own names for that task type (the first by default):
//     upscale          upscale() / upscaleGan(): taskType "upscale" with inputImage; with
//                      deliveryMethod "async" it polls getResponse (pollForAsyncResults) itself
//     removeBackground removeBackground() / removeImageBackground(): the params as given,
//                      taskType "removeBackground"; polls like upscale when async
//     caption          caption() / requestImageToText(): taskType "caption"; it does not forward
//                      deliveryMethod, but with "async" it polls getResponse afterwards
//     enhancePrompt    enhancePrompt() / promptEnhance(): never sends a model (the server's
//                      default runs); waits for promptVersions items
//   result: what each call returned, in order
//   chain            imageInference() of impasto:tiny@1 (ARGS.task on top), then upscale() of its
//                    imageUUID (ARGS.upscale on top); result: {generated, upscaled}
//   invalid          ARGS.method with ARGS.params, expecting a rejection; result: the rejection

import { runClient } from "./client.mjs";

const MODEL = "impasto:tiny@1";
const METHODS = {
  upscale: ["upscale", "upscaleGan"],
  removeBackground: ["removeBackground", "removeImageBackground"],
  caption: ["caption", "requestImageToText"],
  enhancePrompt: ["enhancePrompt", "promptEnhance"],
};


function method(rw, name) {
  if (!Object.values(METHODS).flat().includes(name) || typeof rw[name] !== "function") {
    throw new Error(`the SDK has no utility method ${name}`);
  }
  return rw[name].bind(rw);
}

async function scenario(rw, name, args) {
  if (name in METHODS) {
    const results = [];
    for (const { method: chosen = METHODS[name][0], params } of args.calls) {
      if (!METHODS[name].includes(chosen)) throw new Error(`${chosen} is not a ${name} method`);
      results.push(await method(rw, chosen)(params));
    }
    return results;
  }
  if (name === "chain") {
    const generated = await rw.imageInference({
      model: MODEL,
      positivePrompt: "a lighthouse at dusk",
      width: 64,
      height: 64,
      ...(args.task ?? {}),
    });
    const upscaled = await rw.upscale({
      inputImage: generated[0].imageUUID,
      ...(args.upscale ?? {}),
    });
    return { generated, upscaled };
  }
  if (name === "invalid") {
    try {
      const answer = await method(rw, args.method)(args.params);
      throw new Error(`no error; answer ${JSON.stringify(answer)}`);
    } catch (rejection) {
      if (rejection instanceof Error) throw rejection;
      return rejection;
    }
  }
  throw new Error(`unknown scenario ${name}`);
}

runClient(scenario);
