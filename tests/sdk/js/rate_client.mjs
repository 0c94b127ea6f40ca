// A client of impasto under a rate-limited API key, written with the official @runware/sdk-js
// 1.3.2, used unchanged (Node 20), for tests/integration/test_sdk_rate_limits.py:
//
//     node tests/sdk/js/rate_client.mjs URL calls ARGS_JSON
//
// ARGS: apiKey (the managed key), optionally globalMaxRetries (else the SDK's default), and
// calls: each is {run: {imageInference fields}} (imageInference()) or {upload: data URI}
// (imageUpload()), made in turn until one is rejected. It prints one JSON line,
// {"result": {outcomes: [{images} | {upload} | {rejection}, each with seconds]}}, and exits;
// {"error": ...} if anything else failed.

import { RunwareServer } from "@runware/sdk-js";

const MODEL = "impasto:tiny@1";

function emit(fields) {
  process.stdout.write(JSON.stringify(fields) + "\n");
}

async function call(rw, spec) {
  if (spec.run) {
    return {
      images: await rw.imageInference({
        model: MODEL,
        positivePrompt: "a lighthouse at dusk",
        width: 64,
        height: 64,
        ...spec.run,
      }),
    };
  }
  if (spec.upload) {
    return { upload: await rw.imageUpload({ image: spec.upload }) };
  }
  throw new Error(`unknown call ${JSON.stringify(spec)}`);
}

async function main() {
  const [url, name, rawArgs] = process.argv.slice(2);
  const args = rawArgs ? JSON.parse(rawArgs) : {};
  const rw = new RunwareServer({
    apiKey: args.apiKey,
    url,
    ...(args.globalMaxRetries ? { globalMaxRetries: args.globalMaxRetries } : {}),
  });
  try {
    if (name !== "calls") throw new Error(`unknown scenario ${name}`);
    await rw.ensureConnection();
    const outcomes = [];
    for (const spec of args.calls) {
      const started = Date.now();
      let outcome;
      try {
        outcome = await call(rw, spec);
      } catch (rejection) {
        // The SDK rejects with the server's error ({error: {...}}), not an Error.
        if (rejection instanceof Error) throw rejection;
        outcome = { rejection };
      }
      outcome.seconds = (Date.now() - started) / 1000;
      outcomes.push(outcome);
      if (outcome.rejection) break;
    }
    emit({ result: { outcomes } });
  } catch (failure) {
    emit({ error: failure instanceof Error ? { message: failure.message } : failure });
    process.exitCode = 1;
  } finally {
    await rw.disconnect();
  }
  // The SDK keeps timers (heartbeat, reconnect) that would hold the process open.
  process.exit();
}

main();
