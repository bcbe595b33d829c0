// Drive one instance's life through the official TypeScript SDK and print what the server said.
//
// usage: node instances-smoke.mjs <base-url> <api-key> <image> <instance-name>
//
// Prints one JSON object on stdout: every response as the SDK returned it (the SDK does no
// runtime validation, so these are the server's JSON bodies), for tests/api/test_ts_sdk.py to
// check against the SDK's declared types. The instance is deleted also when a step fails.
import Hypeman from '@onkernel/hypeman';

const [baseURL, apiKey, image, name] = process.argv.slice(2);
if (!name) {
  console.error('usage: instances-smoke.mjs <base-url> <api-key> <image> <instance-name>');
  process.exit(2);
}

const client = new Hypeman({ baseURL, apiKey, maxRetries: 0, timeout: 150_000 });
const DEMO_LINE = 'listening on port 80';

// Lines of a logs stream until `done(line)` or the stream's end; aborted after `ms`.
async function collectLogs(id, query, done, ms) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), ms);
  const lines = [];
  try {
    const stream = await client.instances.logs(id, query, { signal: abort.signal });
    for await (const line of stream) {
      lines.push(line);
      if (done(line)) break;
    }
  } finally {
    clearTimeout(timer);
  }
  return lines;
}

async function errorOf(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    return { class: err.constructor.name, status: err.status ?? null, error: err.error ?? null };
  }
}

const out = {};
let id = null;
try {
  const created = await client.instances.create({
    name,
    image,
    size: '256MB',
    overlay_size: '64MB',
    vcpus: 1,
    env: { GREETING: 'hello-from-ts' },
    tags: { suite: 'ts-smoke' },
  });
  id = created.id;
  out.created = created;
  out.got = await client.instances.get(id);
  out.gotByName = await client.instances.get(name);
  out.listed = await client.instances.list();
  out.listedByTag = await client.instances.list({ tags: { suite: 'ts-smoke' } });
  out.listedByOtherTag = await client.instances.list({ tags: { suite: 'other' } });
  out.waited = await client.instances.wait(id, { state: 'Running', timeout: '120s' });
  out.running = await client.instances.get(id);
  out.listedRunning = await client.instances.list({ state: 'Running' });
  // follow: the stream stays open until the demo's line arrives, then the client closes it.
  out.logs = await collectLogs(id, { follow: true, tail: 100 }, (l) => l.includes(DEMO_LINE), 60_000);
  out.hypemanLogs = await collectLogs(id, { source: 'hypeman', tail: 50 }, () => false, 30_000);
  out.stopped = await client.instances.stop(id);
  out.waitedStopped = await client.instances.wait(id, { state: 'Stopped', timeout: '5s' });
  out.deleteResult = (await client.instances.delete(id)) ?? null;
  id = null;
  out.getAfterDelete = await errorOf(client.instances.get(created.id));
  out.listedAfterDelete = await client.instances.list();
} catch (err) {
  out.failure = { class: err?.constructor?.name, message: String(err?.message ?? err), error: err?.error ?? null };
  process.exitCode = 1;
} finally {
  if (id !== null) {
    await client.instances.delete(id).catch(() => {});
  }
}
console.log(JSON.stringify(out));
