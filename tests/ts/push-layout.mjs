// Push an OCI image layout into hypemand through the TypeScript SDK's lib/push.
//
// usage: node push-layout.mjs <base-url> <api-key> <layout-dir> <layout-tag> <target-name>
//
// The SDK's pushImage takes an OciImageSource (config bytes + gzipped layers); this script builds
// one from the layout's manifest, so that exactly the SDK's own requests reach the server.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import Hypeman from '@onkernel/hypeman';
import { extractPushConfig, pushImage } from '@onkernel/hypeman/lib/push';

const [baseURL, apiKey, layoutDir, layoutTag, targetName] = process.argv.slice(2);
if (!targetName) {
  console.error('usage: push-layout.mjs <base-url> <api-key> <layout-dir> <layout-tag> <target-name>');
  process.exit(2);
}

const blob = (digest) => readFile(path.join(layoutDir, 'blobs', ...digest.split(':')));

const index = JSON.parse(await readFile(path.join(layoutDir, 'index.json'), 'utf8'));
const entry = index.manifests.find(
  (m) => (m.annotations ?? {})['org.opencontainers.image.ref.name'] === layoutTag,
);
if (!entry) throw new Error(`tag ${layoutTag} not in ${layoutDir}`);
const manifest = JSON.parse((await blob(entry.digest)).toString('utf8'));

const source = {
  config: () => blob(manifest.config.digest),
  layers: () =>
    Promise.all(
      manifest.layers.map(async (layer) => ({ digest: layer.digest, size: layer.size, data: await blob(layer.digest) })),
    ),
};

const client = new Hypeman({ baseURL, apiKey });
await pushImage(extractPushConfig(client), source, targetName);
console.log(`pushed ${targetName}`);
