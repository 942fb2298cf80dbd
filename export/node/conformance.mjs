#!/usr/bin/env node
// The conformance runner for the Node client: every case of an export's conformance/ folder (written by
// `magnet export --conformance`; format in export/conformance.py) through magnet.mjs, compared as the vectors say.
//
//   node conformance.mjs EXPORT_DIR [VECTORS_DIR]   -> one JSON line {cases, failures}; exit 0 when all pass
// In a page (app.mjs) the same run() reads the vectors through fetch.
import { MagnetClient, NODE, nested, readJSON } from "./magnet.mjs";

const close = (got, want, tol) => got.length === want.length &&
  got.every((g, i) => Math.abs(g - want[i]) <= tol.abs + tol.rel * Math.abs(want[i]));
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

export function compare(c, codes, trace, tol) {
  const want = c.expected, errors = [];
  if (!same(codes, want.codes)) errors.push(`${c.name}: codes differ`);
  if (trace.length !== want.trace.length)
    return [...errors, `${c.name}: ${trace.length} steps traced, ${want.trace.length} expected`];
  trace.forEach((g, i) => {
    const w = want.trace[i];
    const where = `${c.name}: step ${i} (window ${w.window}, stage ${w.stage}, step ${w.step})`;
    for (const key of ["window", "stage", "step", "n_mask", "remasked"])
      if (!same(g[key], w[key])) errors.push(`${where}: ${key} ${JSON.stringify(g[key])} != ${JSON.stringify(w[key])}`);
    if (!close(g.scores.flat(), w.scores.flat(), tol.scores)) errors.push(`${where}: span scores differ beyond tolerance`);
    if (!same(g.logits.map((x) => x.slice(0, 3)), w.logits.map((x) => x.slice(0, 3))) ||
        !close(g.logits.map((x) => x[3]), w.logits.map((x) => x[3]), tol.logits))
      errors.push(`${where}: logits ${JSON.stringify(g.logits)} != ${JSON.stringify(w.logits)}`);
  });
  return errors;
}

/** `client`: one already loaded from exportDir (a page reuses its own). */
export async function run(exportDir, vectors = `${exportDir}/conformance`, client = null) {
  const index = await readJSON(vectors, "index.json");
  if (index.format !== "magnet-onnx-conformance" || index.version !== 2)
    throw new Error(`${vectors} holds no magnet-onnx-conformance version 2 vectors; write them with ` +
      "`magnet export --conformance`");
  client ??= await MagnetClient.load(exportDir);
  const failures = [];
  for (const name of index.cases) {
    const c = await readJSON(vectors, `${name}.json`);
    const trace = [];
    const { codes, dims } = await client.generate(c.prompts, c.settings,  // a sampled case draws with its uniforms
      { promptCodes: c.prompt_codes ?? null, trace, uniforms: c.uniforms ?? null });
    failures.push(...compare(c, nested(codes, dims), trace, index.tolerance));
  }
  return { cases: index.cases, failures };
}

if (NODE && import.meta.url === (await import("node:url")).pathToFileURL(process.argv[1] ?? "").href) {
  const [dir, vectors] = process.argv.slice(2);
  const result = await run(dir, vectors);
  console.log(JSON.stringify(result));
  process.exitCode = result.failures.length ? 1 : 0;
}
