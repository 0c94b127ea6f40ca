// A client of impasto's OpenAI Images API, written with the official `openai` npm package
// (the version pinned in package.json), used unchanged, for
// tests/integration/test_sdk_openai_js.py:
//
//     node tests/sdk/js/openai_client.mjs BASE_URL calls ARGS_JSON
//
// BASE_URL is the server's OpenAI base URL (http://host:port/v1). ARGS: apiKey (any string on
// an open server), maxRetries (the SDK's own option; 0 unless given) and calls, made in turn,
// each one of
//   {generate: {images.generate() body}}
//   {edit: {images.edit() body, with image: base64 PNG (or a list of them), mask: base64 PNG}}
//   {models: true}                           models.list(), every page
//   {model: "AIR"}                           models.retrieve()
// A call's outcome is {images: [{width, height, format, sha256, source, url?}], response: {the
// rest of the reply}} (each image decoded from b64_json, or fetched from its url, and measured
// from its PNG header), {models: [ids]}, {model: {...}}, or {error: {class, status, message, param,
// code, type, body}} when the SDK threw, each with `requests`: how many HTTP requests the SDK
// sent for the call (its retries included); the client goes on to the next call either way. It
// prints one JSON line, {"result": {outcomes: [...]}}, and exits; {"error": ...} if anything
// else failed. ARGS may also come on stdin (when ARGS_JSON is "-").

import { createHash } from "node:crypto";

import OpenAI, { APIError, toFile } from "openai";

function emit(fields) {
  process.stdout.write(JSON.stringify(fields) + "\n");
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

// The width and height of a PNG from its IHDR chunk (the first one, right after the signature),
// and a digest of the file (to tell images apart, or find one twice).
function measure(bytes) {
  const sha256 = createHash("sha256").update(bytes).digest("hex");
  if (bytes.length < 24 || !bytes.subarray(0, 8).equals(PNG_SIGNATURE)) {
    const head = bytes.subarray(0, 8).toString("hex");
    return { format: "unknown", bytes: bytes.length, sha256, head };
  }
  if (bytes.subarray(12, 16).toString("latin1") !== "IHDR") {
    return { format: "png-without-ihdr", bytes: bytes.length, sha256 };
  }
  return {
    format: "png",
    width: bytes.readUInt32BE(16),
    height: bytes.readUInt32BE(20),
    bytes: bytes.length,
    sha256,
  };
}

async function imageOf(item) {
  if (item.b64_json) {
    return { source: "b64_json", ...measure(Buffer.from(item.b64_json, "base64")) };
  }
  if (item.url) {
    const response = await fetch(item.url);
    if (!response.ok) return { source: "url", url: item.url, fetchStatus: response.status };
    const bytes = Buffer.from(await response.arrayBuffer());
    return {
      source: "url",
      url: item.url,
      fetchStatus: response.status,
      contentType: response.headers.get("content-type"),
      ...measure(bytes),
    };
  }
  return { source: "none", keys: Object.keys(item) };
}

async function images(reply) {
  const { data, ...rest } = reply;
  const measured = [];
  for (const item of data ?? []) measured.push(await imageOf(item));
  return { images: measured, response: rest };
}

async function upload(b64, name) {
  return toFile(Buffer.from(b64, "base64"), name, { type: "image/png" });
}

async function call(client, spec) {
  if (spec.generate) {
    return images(await client.images.generate(spec.generate));
  }
  if (spec.edit) {
    const { image, mask, ...fields } = spec.edit;
    const body = { ...fields };
    if (Array.isArray(image)) {
      body.image = await Promise.all(image.map((b64, i) => upload(b64, `image-${i}.png`)));
    } else {
      body.image = await upload(image, "image.png");
    }
    if (mask) body.mask = await upload(mask, "mask.png");
    return images(await client.images.edit(body));
  }
  if (spec.models) {
    const ids = [];
    for await (const model of client.models.list()) ids.push(model.id);
    return { models: ids };
  }
  if (spec.model) {
    return { model: await client.models.retrieve(spec.model) };
  }
  throw new Error(`unknown call ${JSON.stringify(spec)}`);
}

function describe(failure) {
  return {
    class: failure.constructor.name,
    status: failure.status ?? null,
    message: failure.message,
    param: failure.param ?? null,
    code: failure.code ?? null,
    type: failure.type ?? null,
    body: failure.error ?? null,
  };
}

async function main() {
  const [baseURL, name, rawArgs] = process.argv.slice(2);
  const text = rawArgs === "-" ? await readStdin() : rawArgs;
  const args = text ? JSON.parse(text) : {};
  let requests = 0;
  const client = new OpenAI({
    baseURL,
    apiKey: args.apiKey ?? "unused",
    maxRetries: args.maxRetries ?? 0,
    // The platform's fetch, counted: what the SDK sends, retries included.
    fetch: (url, init) => {
      if (String(url).startsWith(baseURL)) requests += 1;
      return fetch(url, init);
    },
  });
  try {
    if (name !== "calls") throw new Error(`unknown scenario ${name}`);
    const outcomes = [];
    for (const spec of args.calls) {
      const started = Date.now();
      requests = 0;
      let outcome;
      try {
        outcome = await call(client, spec);
      } catch (failure) {
        // What the SDK made of an HTTP error; anything else (a bug here) fails the run.
        if (!(failure instanceof APIError)) throw failure;
        outcome = { error: describe(failure) };
      }
      outcome.seconds = (Date.now() - started) / 1000;
      outcome.requests = requests;
      outcomes.push(outcome);
    }
    emit({ result: { outcomes } });
  } catch (failure) {
    emit({ error: { message: String(failure?.stack ?? failure) } });
    process.exitCode = 1;
  }
}

main();
