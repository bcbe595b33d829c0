// Drive a builder and two builds through the official TypeScript SDK and print what the server said.
//
// usage: node builds-smoke.mjs <base-url> <api-key> <app.tar.gz> <sleeper.tar.gz>
//
// The builder is created, listed and got; the app context (a Dockerfile with COPY and RUN) is
// built on it with tags and polled until it ends, found again by its tags, and its events are
// replayed; the sleeper context (RUN sleep 600) is built on it and cancelled once its followed
// events show the RUN; the builder is pruned and deleted. Prints one JSON object on stdout:
// every response as the SDK returned it (the SDK validates nothing at runtime, so these are the
// server's JSON bodies), and what the SDK put on the wire for each POST /builds (part order and
// headers of the multipart body) and each GET's query, for tests/api/test_ts_builds.py to
// check. What the script made is deleted also when a step fails.
import { createReadStream, readFileSync } from 'node:fs';
import Hypeman, { toFile } from '@onkernel/hypeman';

const [baseURL, apiKey, appTarball, sleeperTarball] = process.argv.slice(2);
if (!sleeperTarball) {
  console.error('usage: builds-smoke.mjs <base-url> <api-key> <app.tar.gz> <sleeper.tar.gz>');
  process.exit(2);
}

const FINISHED = ['ready', 'failed', 'cancelled'];
const DEADLINE_MS = 600_000; // a hang guard: a build here takes about a minute
const TAGS = { suite: 'ts-builds', run: String(process.pid) };

// What the SDK sends: the multipart body of each upload as the fetch would encode it (the
// headers of each part, in order) and the query of each GET.
const wire = { uploads: [], queries: [] };

function partsOf(body, boundary) {
  const parts = [];
  for (const chunk of body.split(`--${boundary}`).slice(1, -1)) {
    const head = chunk.slice(2, chunk.indexOf('\r\n\r\n'));
    const headers = Object.fromEntries(head.split('\r\n').map((line) => {
      const colon = line.indexOf(':');
      return [line.slice(0, colon).toLowerCase(), line.slice(colon + 1).trim()];
    }));
    const disposition = headers['content-disposition'] ?? '';
    parts.push({
      name: /; name="([^"]*)"/.exec(disposition)?.[1] ?? null,
      filename: /; filename="([^"]*)"/.exec(disposition)?.[1] ?? null,
      content_type: headers['content-type'] ?? null,
      value: /filename=/.test(disposition) ? null : chunk.slice(chunk.indexOf('\r\n\r\n') + 4, -2),
    });
  }
  return parts;
}

async function recordingFetch(url, init = {}) {
  const target = new URL(url);
  if (init.body instanceof FormData) {
    const encoded = new Request(target, { method: 'POST', body: init.body });
    const contentType = encoded.headers.get('content-type');
    const boundary = /boundary=(.*)$/.exec(contentType)[1];
    const body = Buffer.from(await encoded.arrayBuffer()).toString('latin1');
    wire.uploads.push({ path: target.pathname, content_type: contentType, parts: partsOf(body, boundary) });
  } else if ((init.method ?? 'GET') === 'GET' && target.search) {
    wire.queries.push({ path: target.pathname, search: decodeURIComponent(target.search) });
  }
  return fetch(url, init);
}

const client = new Hypeman({ baseURL, apiKey, maxRetries: 0, timeout: 150_000, fetch: recordingFetch });

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Poll builds.get until `done(build)`; `seen` gets each status the polls saw, once.
async function poll(id, done, seen) {
  const deadline = Date.now() + DEADLINE_MS;
  for (;;) {
    const build = await client.builds.get(id);
    if (seen.at(-1) !== build.status) seen.push(build.status);
    if (done(build)) return build;
    if (FINISHED.includes(build.status)) throw new Error(`build ${id} ended ${build.status}: ${build.error}`);
    if (Date.now() > deadline) throw new Error(`build ${id} still ${build.status}`);
    await sleep(300);
  }
}

// Events of a followed stream until `done(event)`; aborted at the deadline.
async function followUntil(id, done) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), DEADLINE_MS);
  const events = [];
  try {
    for await (const event of await client.builds.events(id, { follow: true }, { signal: abort.signal })) {
      events.push(event);
      if (done(event)) break;
    }
  } finally {
    clearTimeout(timer);
  }
  return events;
}

async function errorOf(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    return { class: err.constructor.name, status: err.status ?? null, error: err.error ?? null };
  }
}

const out = { wire };
let builderId = null;
const started = [];
try {
  const builder = await client.builders.create({ name: 'ts-builder', disk_size_gb: 2, tags: TAGS });
  builderId = builder.id;
  out.builderCreated = builder;
  out.buildersListed = await client.builders.list();
  out.builderGot = await client.builders.get(builderId);

  // The app: source a File made with the SDK's toFile, first among the fields.
  const source = await toFile(readFileSync(appTarball), 'app.tar.gz', { type: 'application/gzip' });
  const app = await client.builds.create({
    source, builder_id: builderId, tags: JSON.stringify(TAGS), memory_mb: 768, cpus: 1,
  });
  started.push(app.id);
  out.appCreated = app;
  out.appPolled = [];
  out.appReady = await poll(app.id, (b) => FINISHED.includes(b.status), out.appPolled);
  out.appListedByTags = await client.builds.list({ tags: TAGS });
  out.appListedByOtherTag = await client.builds.list({ tags: { suite: 'other' } });
  out.appListed = await client.builds.list();
  out.appEvents = [];
  for await (const event of await client.builds.events(app.id, { follow: false })) out.appEvents.push(event);

  // The sleeper: source a file stream, which the SDK reads whole and so appends after the fields.
  const sleeper = await client.builds.create({
    source: createReadStream(sleeperTarball), builder_id: builderId, memory_mb: 768, cpus: 1,
  });
  started.push(sleeper.id);
  out.sleeperCreated = sleeper;
  out.sleeperPolled = [];
  out.sleeperBuilding = await poll(sleeper.id, (b) => b.status === 'building' && b.builder_instance_id,
    out.sleeperPolled);
  out.builderBusy = await client.builders.get(builderId);
  // `building` comes as the VM starts: follow the events until buildah runs the RUN, so the
  // cancel stops a running step.
  out.sleeperFollowed = await followUntil(sleeper.id, (e) => e.type === 'log' && e.content?.includes('sleep 600'));
  out.cancelResult = (await client.builds.cancel(sleeper.id)) ?? null;
  out.sleeperCancelled = await client.builds.get(sleeper.id);
  out.sleeperVmAfterCancel = await errorOf(client.instances.get(out.sleeperBuilding.builder_instance_id));
  out.cancelAgain = await errorOf(client.builds.cancel(sleeper.id));
  out.sleeperEvents = [];
  for await (const event of await client.builds.events(sleeper.id, { follow: false })) {
    out.sleeperEvents.push(event);
  }

  out.builderPruned = await client.builders.prune(builderId);
  out.builderAfterPrune = await client.builders.get(builderId);
  out.deleteResult = (await client.builders.delete(builderId)) ?? null;
  builderId = null;
  out.builderGetAfterDelete = await errorOf(client.builders.get(builder.id));
  out.buildersListedAfterDelete = await client.builders.list();
} catch (err) {
  out.failure = { class: err?.constructor?.name, message: String(err?.message ?? err), error: err?.error ?? null };
  process.exitCode = 1;
} finally {
  for (const id of started) await client.builds.cancel(id).catch(() => {});
  if (builderId !== null) {
    await client.builders.delete(builderId).catch(() => {});
  }
}
console.log(JSON.stringify(out));
