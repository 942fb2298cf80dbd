#!/usr/bin/env node
// Median latency of one request (text -> tokens -> audio) through the Node client, after one warm-up:
//   node export/node/bench.mjs EXPORT_DIR THREADS [REPEATS]   -> one JSON line
import { MagnetClient } from "./magnet.mjs";

const [dir, threads = "1", repeats = "5"] = process.argv.slice(2);
let t0 = performance.now();
const client = await MagnetClient.load(dir, { threads: Number(threads) });
const loadS = (performance.now() - t0) / 1000;
const medians = {};
for (const [mode, settings] of [["greedy", { greedy: true }], ["sampled", { seed: 0 }]]) {
  const times = [];
  for (let i = 0; i <= Number(repeats); i++) {
    t0 = performance.now();
    const { codes, dims } = await client.generate(["a fast techno beat with a deep bass"], settings);
    await client.decode(codes, dims);
    if (i > 0) times.push((performance.now() - t0) / 1000);  // the first run warms up
  }
  times.sort((a, b) => a - b);
  medians[mode] = times[Math.floor(times.length / 2)];
}
console.log(JSON.stringify({ bench: "node-request", dir, threads: Number(threads), load_s: loadS, request_s: medians }));
