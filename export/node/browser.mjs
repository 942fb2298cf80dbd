#!/usr/bin/env node
// Drives the MAGNeT page (index.html) in a real headless Chromium, the system's own (`apt-get install chromium`),
// through playwright-core: no browser download. Used by tests/test_web.py and bench/web.py.
//
//   node browser.mjs CHROMIUM SCRIPT.json   -> one JSON line: {"results": [one per op], "errors": [page errors]}
//
// SCRIPT: a list of ops, run in order in one page:
//   {"op": "goto", "url": U}                        open the page; waits until the model loaded (or failed)
//   {"op": "call", "fn": "conformance"|"generate", "args": [...]}   window.magnetPage[fn](...args)
//   {"op": "form", "values": {id: value}, "checked": {id: bool}}    fill the form, press Generate, wait for the end
//   {"op": "screenshot", "path": P}                 the whole page as PNG
import fs from "node:fs";
import { chromium } from "playwright-core";

const [executablePath, scriptPath] = process.argv.slice(2);
if (!executablePath || !scriptPath) {
  process.stderr.write("usage: node browser.mjs CHROMIUM SCRIPT.json\n");
  process.exit(2);
}
const script = JSON.parse(fs.readFileSync(scriptPath, "utf8"));
const browser = await chromium.launch({ executablePath, headless: true });
const errors = [];
const results = [];
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 1000 } });
  page.on("pageerror", (e) => errors.push(String(e.message).split("\n")[0]));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text().split("\n")[0]); });
  const settled = () => page.waitForFunction(() => window.magnetPage && !["loading", "running"].includes(
    window.magnetPage.state), null, { timeout: 0, polling: 50 });
  for (const op of script) {
    if (op.op === "goto") {
      const t0 = Date.now();
      await page.goto(op.url);
      await settled();
      const r = await page.evaluate(() => ({ state: magnetPage.state, error: magnetPage.error,
        runtime: magnetPage.runtime ?? null, isolated: crossOriginIsolated }));
      results.push({ ...r, load_s: (Date.now() - t0) / 1000 });
    } else if (op.op === "call") {
      results.push(await page.evaluate(async ([fn, args]) => {
        try { return { ok: await window.magnetPage[fn](...args) }; } catch (e) { return { error: e.message }; }
      }, [op.fn, op.args ?? []]));
    } else if (op.op === "form") {
      for (const [id, value] of Object.entries(op.values ?? {})) await page.fill(`#${id}`, String(value));
      for (const [id, on] of Object.entries(op.checked ?? {})) await page.setChecked(`#${id}`, on);
      await page.click("#generate");
      await settled();
      if (await page.evaluate(() => magnetPage.state === "done"))  // the <audio> has read the WAV's header
        await page.waitForFunction(() => document.getElementById("audio").readyState >= 1, null, { timeout: 30000 });
      results.push(await page.evaluate(() => ({
        state: magnetPage.state, error: magnetPage.error, shown_error: document.getElementById("error").textContent,
        progress: magnetPage.progress, last: magnetPage.state === "done" ? magnetPage.last : null,
        bar: [document.getElementById("progress").value, document.getElementById("progress").max],
        audio_src: document.getElementById("audio").src, audio_s: document.getElementById("audio").duration, timing: document.getElementById("timing").textContent,
        download: document.getElementById("download").href })));
    } else if (op.op === "screenshot") {
      await page.screenshot({ path: op.path, fullPage: true });
      results.push({ path: op.path });
    } else throw new Error(`unknown op ${JSON.stringify(op)}`);
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify({ results, errors }) + "\n");
