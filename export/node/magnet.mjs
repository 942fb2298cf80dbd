#!/usr/bin/env node
// MAGNeT text-to-audio from a `magnet export` folder: the manifest's "client" section (format_version 3) in
// JavaScript, one module for Node (onnxruntime-node, files from disk) and the browser (onnxruntime-web, files
// through fetch; the page in index.html + app.mjs). Greedy runs are token-exact with `magnet generate --backend onnx`.
//
//   node magnet.mjs --model EXPORT_DIR "80s synth pop" "slow sad piano" --greedy -o out/ --tokens-out t.json
//
// Shapes: B prompts, K codebooks, T frames, L text tokens, V vocabulary, C span chunks. Tensors are flat typed
// arrays in row-major order. Arithmetic that decides tokens is done in float32 (Math.fround after every operation),
// as the engine does it in torch.
import { Tokenizer } from "@huggingface/tokenizers";

// The platform's modules: Node reads the export from disk; a page fetches it and picks its onnxruntime-web bundle
// in MagnetClient.load (the page's import map names "onnxruntime-web" and "onnxruntime-web/wasm").
export const NODE = typeof process !== "undefined" && Boolean(process.versions?.node) && typeof window === "undefined";
const fs = NODE ? (await import("node:fs")).default : null;
const path = NODE ? (await import("node:path")).default : null;
const pathToFileURL = NODE ? (await import("node:url")).pathToFileURL : null;

export const FORMAT_VERSION = 3;
const f32 = Math.fround;

export class UsageError extends Error {}

// ------------------------------------------------------------------------------------------------ settings

/** Settings as `magnet generate` takes them, checked against the model (GenerationConfig's checks). */
export function resolveSettings(client, given = {}) {
  const c = client.c;
  const d = c.defaults;
  const s = { ...d, ...Object.fromEntries(Object.entries(given).filter(([, v]) => v !== undefined)) };
  const fail = (msg) => { throw new UsageError(msg); };
  if (!Array.isArray(s.steps) || s.steps.length !== c.codebooks || s.steps.some((n) => !Number.isInteger(n) || n < 1))
    fail(`--steps needs ${c.codebooks} positive integers (one per codebook), e.g. ${d.steps.join(",")}`);
  const maxSteps = c.limits.steps_per_stage[1];
  if (s.steps.some((n) => n > maxSteps)) fail(`--steps: at most ${maxSteps} per codebook (the manifest's schedule)`);
  if (!(s.top_p >= 0 && s.top_p <= 1)) fail(`--top-p must be in [0, 1], got ${s.top_p}; 0 turns it off`);
  if (!Number.isInteger(s.top_k) || s.top_k < 0 || s.top_k > c.vocab)
    fail(`--top-k must be an integer in [0, ${c.vocab}], got ${s.top_k}; 0 turns it off`);
  if (!(s.temperature >= 0)) fail(`--temperature must be >= 0, got ${s.temperature}`);
  if (!Array.isArray(s.cfg) || s.cfg.length < 1 || s.cfg.length > 2 || s.cfg.some((x) => !(x >= 0)))
    fail(`--cfg takes MAX,MIN (annealed) or one constant, each >= 0; got ${s.cfg}`);
  if (!["nonoverlap", "stride1"].includes(s.span_arrangement))
    fail(`--span-arrangement must be nonoverlap or stride1, got ${s.span_arrangement}`);
  if (!["max", "prod"].includes(s.span_scoring)) fail(`--span-scoring must be max or prod, got ${s.span_scoring}`);
  const maxSeconds = c.limits.duration_seconds[1];
  if (!(s.duration > 0 && s.duration <= maxSeconds)) fail(`--duration must be in (0, ${maxSeconds}] seconds, got ${s.duration}`);
  const frames = roundHalfEven(s.duration * c.frame_rate);
  const [, maxT] = c.limits.frames;
  if (frames < 1) fail(`--duration ${s.duration}s is shorter than one frame (1/${c.frame_rate}s)`);
  const multiple = s.span_arrangement === "nonoverlap" ? c.span_len : 1;
  const window = maxT - (maxT % multiple);  // one segment's output frames (frames_rule)
  const long = frames > maxT;  // longform: window by window, exactly `frames` frames
  const t = long ? frames : frames - (frames % multiple);
  if (t < 1) fail(`--duration ${s.duration}s is shorter than one span of ${c.span_len} frames`);
  const seconds = s.context ?? c.longform.context_seconds_default;
  const context = roundHalfEven(seconds * c.frame_rate);
  if (long && !(context >= 1 && context < window))
    fail(`--context ${seconds}s must be at least one frame and shorter than the window of ${window / c.frame_rate}s`);
  return { ...s, frames: t, long, window, context, multiple, guided: !(s.cfg[0] === 1 && s.cfg[s.cfg.length - 1] === 1) };
}

/** longform's rule: [length, keep] of every window after the first (whose length is the window, all kept). */
export function longformPlan(s) {
  const out = [];
  for (let end = s.window; end < s.frames;) {
    const keep = Math.min(s.frames - end, s.window - s.context);
    out.push([Math.min(s.window, Math.ceil((s.context + keep) / s.multiple) * s.multiple), keep]);
    end += keep;
  }
  return out;
}

/** Python's round(): half to even. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// ------------------------------------------------------------------------------------------------ the client

/** A file of an export folder: a path on Node, a URL (relative to the page) in a browser. */
function where(dir, rel) {
  if (NODE) return path.join(dir, rel);
  return new URL(rel, new URL(String(dir).endsWith("/") ? dir : `${dir}/`, globalThis.location?.href)).href;
}

/** The bytes of an export file (Uint8Array), or null when it is not there. */
export async function readBytes(dir, rel) {
  const at = where(dir, rel);
  if (NODE) return fs.existsSync(at) ? new Uint8Array(fs.readFileSync(at)) : null;
  const r = await fetch(at);
  return r.ok ? new Uint8Array(await r.arrayBuffer()) : null;
}

/** A JSON file of an export folder; `missing`: the value when it is absent (else a one-line UsageError). */
export async function readJSON(dir, rel, missing = undefined) {
  const bytes = await readBytes(dir, rel);
  if (bytes === null) {
    if (missing !== undefined) return missing;
    throw new UsageError(`${where(dir, rel)} is missing`);
  }
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** In a page: onnxruntime-web and its execution provider. "auto" takes WebGPU where the browser has a hardware
 *  adapter (a software fallback adapter is slower than WASM) and else WASM; `runtime.note` says why. WebGPU's float
 *  arithmetic differs from the CPU's: its greedy tokens may differ from the engine's (WASM's are the engine's).
 *  WASM runs `threads` threads (0: up to 4 where the page is cross-origin isolated, else 1: without isolation there
 *  is no SharedArrayBuffer, so no threads). */
async function webRuntime(backend, threads) {
  if (!["auto", "wasm", "webgpu"].includes(backend))
    throw new UsageError(`backend must be auto, wasm or webgpu, got ${backend}`);
  const isolated = Boolean(globalThis.crossOriginIsolated);
  let note = "";
  if (backend !== "wasm") {
    const gpu = globalThis.navigator?.gpu;
    const adapter = gpu ? await gpu.requestAdapter({ powerPreference: "high-performance" }).catch(() => null) : null;
    const software = Boolean(adapter?.info?.isFallbackAdapter ?? adapter?.isFallbackAdapter);
    if (adapter && (!software || backend === "webgpu"))
      return { ort: await import("onnxruntime-web"), ep: "webgpu", threads: 1, isolated, note: software ?
        "a software WebGPU adapter" : "" };
    note = !gpu ? "no WebGPU in this browser: WASM instead" : !adapter ? "no WebGPU adapter: WASM instead"
      : "only a software WebGPU adapter: WASM instead";
    if (backend === "webgpu") throw new UsageError(`${note.split(":")[0]}; choose WASM`);
  }
  const ort = await import("onnxruntime-web/wasm");
  const most = isolated ? Math.min(4, globalThis.navigator?.hardwareConcurrency || 1) : 1;
  if (threads > 1 && !isolated) note = `${threads} threads asked, 1 used: the page is not cross-origin isolated`;
  ort.env.wasm.numThreads = threads > 0 ? Math.min(threads, isolated ? threads : 1) : most;
  return { ort, ep: "wasm", threads: ort.env.wasm.numThreads, isolated, note };
}

export class MagnetClient {
  /** `dir`: an export folder (Node) or its URL (a page). `backend` (page only): auto | wasm | webgpu. */
  static async load(dir, { threads = 0, backend = "auto" } = {}) {
    const manifest = await readJSON(dir, "manifest.json", null);
    if (manifest === null)
      throw new UsageError(`${dir} is not a MAGNeT ONNX export (no manifest.json); create one with ` +
        "`magnet export --model MODEL --out DIR`");
    if (manifest.format !== "magnet-onnx" || manifest.format_version !== FORMAT_VERSION)
      throw new UsageError(`${dir} has export format ${manifest.format} version ${manifest.format_version}; this ` +
        `client reads magnet-onnx version ${FORMAT_VERSION}: re-export with \`magnet export\``);
    const rt = NODE ? { ort: await import("onnxruntime-node"), ep: "cpu", threads, isolated: false, note: "" }
      : await webRuntime(backend, threads);
    // errors only: int8 graphs warn about re-using a buffer for the empty unconditional half when N = B
    const opts = { executionProviders: [rt.ep], graphOptimizationLevel: "all", logSeverityLevel: 3 };
    if (NODE && threads > 0) Object.assign(opts, { intraOpNumThreads: threads, interOpNumThreads: 1 });
    const sessions = {};
    for (const name of ["text_encoder", "cross_kv", "lm_step", "codec_decode"]) {
      const file = manifest.graphs[name].file;
      const graph = NODE ? where(dir, file) : await readBytes(dir, file);
      if (graph === null) throw new UsageError(`${where(dir, file)} is missing: re-export with \`magnet export\``);
      sessions[name] = await rt.ort.InferenceSession.create(graph, opts);
    }
    const tok = manifest.client.text.tokenizer;
    const tokJson = await readJSON(dir, tok);
    const tokCfg = await readJSON(dir, `${tok.slice(0, tok.lastIndexOf("/") + 1)}tokenizer_config.json`, {});
    const client = new MagnetClient(manifest, sessions, new Tokenizer(tokJson, tokCfg));
    client.ort = rt.ort;
    client.runtime = { backend: rt.ep, threads: rt.threads, isolated: rt.isolated, note: rt.note };
    return client;
  }

  constructor(manifest, sessions, tokenizer) {
    this.manifest = manifest;
    this.c = manifest.client;
    this.sessions = sessions;
    this.tokenizer = tokenizer;
    this.kvNames = manifest.cross_kv_names;
    this.dim = manifest.model_config.dim;
  }

  /** Token ids of one prompt (tokenizer.json has no padding or truncation). */
  tokenize(text) {
    const ids = this.tokenizer.encode(text, { add_special_tokens: this.c.text.add_special_tokens }).ids;
    const max = this.c.limits.text_tokens_max;
    if (ids.length > max)
      throw new UsageError(`a prompt of ${ids.length} tokens; the text encoder takes 1 to ${max}: shorten it`);
    return ids;
  }

  // ---- the graph calls, each refusing an input outside manifest client.boundary (one line) before it runs

  /** text_encoder: ids and mask [1, l] (ort int64 tensors) -> text_embeds data [l * dim]. */
  async encodeText(ids, mask) {
    const [lo, hi] = this.c.limits.text_ids, max = this.c.limits.text_tokens_max;
    if (ids.dims.length !== 2 || mask.dims.length !== 2 || ids.dims.some((d, i) => d !== mask.dims[i]))
      throw new RangeError(`input_ids [${ids.dims}] and attention_mask [${mask.dims}] differ in shape; give one ` +
        "mask entry per token");
    if (ids.dims[0] !== 1) throw new RangeError(`text_encoder takes one prompt per run ([1, l]), got [${ids.dims}]`);
    const l = ids.dims[1];
    if (l < 1 || l > max) throw new RangeError(`a prompt of ${l} tokens; the text encoder takes 1 to ${max}: ` +
      (l ? "shorten it" : "tokenize with the special tokens (EOS)"));
    for (const x of ids.data) if (x < lo || x > hi) throw new RangeError(`input_ids must lie in [${lo}, ${hi}], found ${x}`);
    return (await this.sessions.text_encoder.run({ input_ids: ids, attention_mask: mask })).text_embeds.data;
  }

  /** cross_kv: text_embeds [B, L, dim] -> { cross_k_i, cross_v_i } [B, H, L, D]. */
  async crossKV(embeds) {
    const [b, l, d] = embeds.dims;
    if (embeds.type !== "float32" || embeds.dims.length !== 3 || b < 1 || l < 1 || d !== this.dim)
      throw new RangeError(`text_embeds must be float32 [B, L, ${this.dim}] with B, L >= 1, got [${embeds.dims}]`);
    return this.sessions.cross_kv.run({ text_embeds: embeds });
  }

  /** lm_step: codes BigInt64Array [N, K, T] (N = 2B guided, B not), stage, kv of one crossKV run ([B, ...] each)
   *  -> logits Float32Array [N, T, V]. */
  async step(codes, dims, stage, kv, guided) {
    this.checkStep(codes, dims, stage, kv, guided);
    const feeds = { ...kv, codes: new this.ort.Tensor("int64", codes, dims),
                    stage: new this.ort.Tensor("int64", BigInt64Array.of(BigInt(stage)), []) };
    return (await this.sessions.lm_step.run(feeds, ["logits"])).logits.data;
  }

  /** The text rule: each prompt alone, zero-padded to the longest; null = an all-zero row. -> [B, L, dim]. */
  async text(prompts) {
    const embeds = [];
    for (const p of prompts) {
      if (p === null) { embeds.push(null); continue; }
      const ids = this.tokenize(p);
      const l = ids.length;
      const idT = new this.ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, l]);
      const maskT = new this.ort.Tensor("int64", new BigInt64Array(l).fill(1n), [1, l]);
      embeds.push(await this.encodeText(idT, maskT));
    }
    const L = Math.max(1, ...embeds.filter((e) => e !== null).map((e) => e.length / this.dim));
    const data = new Float32Array(prompts.length * L * this.dim);
    embeds.forEach((e, i) => { if (e !== null) data.set(e, i * L * this.dim); });
    return new this.ort.Tensor("float32", data, [prompts.length, L, this.dim]);
  }

  /** (n_mask, cfg, temperature) per step of a stage: the stored tables for the default settings, else the stored
   *  float32 mask fractions and the manifest's rule. No cosine is evaluated. */
  plan(stage, nSteps, nGen, s) {
    const d = this.c.defaults;
    const table = this.c.schedule.default[stage];
    const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
    if (table && table.steps === nSteps && same(s.cfg, d.cfg) && s.temperature === d.temperature &&
        s.anneal_temp === d.anneal_temp)
      return table.mask_p.map((_, i) => [table.n_mask[i][nGen - 1], table.cfg[i], table.temperature[i]]);
    const cmax = s.cfg[0], cmin = s.cfg[s.cfg.length - 1];
    return this.c.schedule.mask_p_by_steps[String(nSteps)].map((p, i) => {
      const t = s.anneal_temp ? s.temperature * ((nSteps - 1 - i) / nSteps) : s.temperature;
      return [Math.max(1, Math.trunc(f32(p * nGen))), p * cmax + (1 - p) * cmin, Math.max(t, 0.01)];
    });
  }

  /** Refusals at the lm_step boundary (manifest client.boundary.lm_step), before onnxruntime runs. */
  checkStep(codes, dims, stage, kv, guided) {
    const c = this.c;
    if (!(codes instanceof BigInt64Array)) throw new TypeError("lm_step codes must be a BigInt64Array (int64)");
    const [n, k, t] = dims;
    if (dims.length !== 3 || k !== c.codebooks || codes.length !== n * k * t)
      throw new RangeError(`lm_step codes must be [N, ${c.codebooks}, T], got [${dims}]`);
    if (n < 1 || (guided && n % 2)) throw new RangeError(`a guided step's codes hold [cond; uncond] = 2B rows, got ${n}`);
    const batch = guided ? n / 2 : n;
    const first = kv[this.kvNames[0]]?.dims;
    if (!first) throw new RangeError(`cross k/v must hold ${this.kvNames.join(", ")}: pass one crossKV run's outputs`);
    const rows = first[0];
    if (rows !== batch && (n === rows || n === 2 * rows))
      throw new RangeError(`cross k/v have ${rows} rows for ${guided ? "a guided" : "an unguided"} step of ${n} codes rows: ` +
        `they must have ${batch} (the prompts' own rows; never pass [cond; null])`);
    if (n !== rows && n !== 2 * rows)
      throw new RangeError(`codes have ${n} rows against cross k/v of ${rows}: lm_step takes ${rows} (unguided) or ` +
        `${2 * rows} (guided: [cond; uncond])`);
    for (const name of this.kvNames) {
      const d = kv[name]?.dims;
      if (!d || d.length !== 4 || d.some((x, i) => x !== first[i]))
        throw new RangeError(`${name} is [${d}], ${this.kvNames[0]} is [${first}]: every k/v must come from one ` +
          "crossKV run");
    }
    if (t < 1 || t > c.limits.frames[1])
      throw new RangeError(`codes have ${t} frames; lm_step takes 1 to ${c.limits.frames[1]} (the model's segment): ` +
        "generate a long piece window by window (manifest client.longform)");
    if (!Number.isInteger(stage) || stage < c.limits.stage[0] || stage > c.limits.stage[1])
      throw new RangeError(`stage must be an integer in [0, ${c.codebooks}), got ${stage}`);
    const [lo, hi] = c.limits.lm_step_codes;
    for (const x of codes) if (x < lo || x > hi)
      throw new RangeError(`codes must lie in [${lo}, ${hi}] (tokens, or ${hi} = masked), found ${x}`);
  }

  /** -> { codes: Int32Array [B, K, T], dims }. `promptCodes`: nested [B or 1][K][P] ints to continue. Past the
   *  segment, window by window (manifest client.longform). `trace`: an array that receives one entry per step, as
   *  the conformance vectors state them (export/conformance.py). `uniforms`: nested [S][B][T] numbers in [0, 1),
   *  one [B][T] per decoding step in order (every window's), read by a sampled run in place of its own generator
   *  (a conformance vector's sampled case); all must be used. */
  async generate(prompts, settings, { promptCodes = null, progress = null, trace = null, uniforms = null } = {}) {
    const s = resolveSettings(this, settings);
    const B = prompts.length, K = this.c.codebooks;
    if (B < 1) throw new UsageError("no prompt given: pass at least one text");
    const given = uniforms && !s.greedy ? givenNoise(uniforms) : null;
    const noise = given ?? seededNoise(mulberry32(s.seed ?? Math.floor(Math.random() * 2 ** 32)));
    const kv = await this.crossKV(await this.text(prompts));
    const later = s.long ? longformPlan(s) : [];
    const total = s.steps.reduce((a, x) => a + x, 0) * (1 + later.length);
    let done = 0;
    const tick = progress && (() => progress(++done, total));
    const first = s.long ? s.window : s.frames;
    let piece = await this.segment(kv, B, first, promptCodes, s, noise, trace, 0, tick);
    let T = first;
    for (const [w, [length, keep]] of later.entries()) {  // each continues from the piece's last C frames
      const C = s.context;
      const prompt = nested(piece, [B, K, T]).map((item) => item.map((r) => r.slice(T - C)));
      const out = await this.segment(kv, B, length, prompt, s, noise, trace, w + 1, tick);
      const next = new Int32Array(B * K * (T + keep));
      for (let b = 0; b < B; b++) for (let k = 0; k < K; k++) {
        next.set(piece.subarray((b * K + k) * T, (b * K + k + 1) * T), (b * K + k) * (T + keep));
        next.set(out.subarray((b * K + k) * length + C, (b * K + k) * length + C + keep), (b * K + k) * (T + keep) + T);
      }
      piece = next;
      T += keep;
    }
    const left = given?.left();
    if (left) throw new UsageError(`uniforms hold ${left} more step${left > 1 ? "s" : ""} than the run decoded: give ` +
      "one [B][T] per decoding step");
    return { codes: piece, dims: [B, K, T] };
  }

  /** One segment of T frames, the prompt's included -> Int32Array [B, K, T]. */
  async segment(kv, B, T, promptCodes, s, noise, trace, window, tick) {
    const c = this.c;
    const K = c.codebooks, V = c.vocab, span = c.span_len, maskId = c.mask_id;
    const P = promptCodes ? checkPrompt(promptCodes, B, K, V, T) : 0;
    const codes = new Int32Array(B * K * T).fill(maskId);
    const at = (b, k, t) => (b * K + k) * T + t;
    const promptAt = (b, k, t) => promptCodes[promptCodes.length === 1 ? 0 : b][k][t];
    for (let b = 0; b < B; b++) for (let k = 0; k < K; k++) for (let t = 0; t < P; t++) codes[at(b, k, t)] = promptAt(b, k, t);
    const chunked = s.span_arrangement === "nonoverlap" || span === 1;
    for (let stage = 0; stage < K; stage++) {
      const row = new Int32Array(B * T).fill(maskId);
      const units = chunked ? T / span : T;  // nonoverlap: T is a multiple of span
      const nPrompt = chunked ? Math.floor(P / span) : P;
      let scores = new Float32Array(B * units);
      for (let b = 0; b < B; b++) scores.fill(c.spans.dont_remask, b * units, b * units + nPrompt);
      const nGen = units - nPrompt;
      let chunks = null;
      for (const [i, [nMask, coef, temp]] of this.plan(stage, s.steps[stage], nGen, s).entries()) {
        let remask, picked;
        if (chunked) {
          picked = chunks = topN(scores, B, units, nMask);
          remask = (b, t) => chunks[b * units + Math.floor(t / span)];
        } else {
          const m = picked = leastProbableSpans(scores, B, T, nMask, span);
          remask = (b, t) => m[b * T + t];
        }
        for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) {
          if (remask(b, t)) row[b * T + t] = maskId;
          if (t < P) row[b * T + t] = promptAt(b, stage, t);
          codes[at(b, stage, t)] = row[b * T + t];
        }
        const n = s.guided ? 2 * B : B;
        const input = new BigInt64Array(n * K * T);
        for (let j = 0; j < codes.length; j++) input[j] = BigInt(codes[j]);
        if (s.guided) input.copyWithin(B * K * T, 0, B * K * T);  // [cond; uncond]: the same codes twice
        const logits = await this.step(input, [n, K, T], stage, kv, s.guided);  // [N, T, V]
        const probs = new Float32Array(B * T);  // the chosen token's probability
        const masked = new Uint8Array(B * T);
        const cf = f32(coef), tf = f32(temp);
        const g = new Float32Array(V);
        const u = s.greedy ? null : noise(B, T);  // this step's uniforms [B, T]
        for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) {
          const cond = (b * T + t) * V, unc = s.guided ? ((B + b) * T + t) * V : cond;
          for (let v = 0; v < V; v++) g[v] = f32(logits[unc + v] + f32(f32(logits[cond + v] - logits[unc + v]) * cf));
          const [tok, p] = choose(g, tf, s, u && u[b * T + t]);
          probs[b * T + t] = p;
          if (row[b * T + t] === maskId) {
            masked[b * T + t] = 1;
            row[b * T + t] = tok;
          }
          codes[at(b, stage, t)] = row[b * T + t];
        }
        scores = new Float32Array(B * units);
        for (let b = 0; b < B; b++) for (let u = 0; u < units; u++) {
          const j = b * units + u;
          if (chunked) {
            scores[j] = chunks[j] ? chunkScore(probs, b * T + u * span, span, s.span_scoring) : c.spans.dont_remask;
          } else {
            scores[j] = masked[j] ? f32(-Math.log(probs[j])) : c.spans.dont_remask;
          }
        }
        if (trace) trace.push(traceStep(window, stage, i, nMask, picked, scores, logits, B, units, [n, T, V]));
        if (tick) await tick();  // a page's callback may yield so the progress bar paints
      }
    }
    return codes;
  }

  /** codes [B, K, T] -> audio Float32Array [B, 1, T·hop]. */
  async decode(codes, dims) {
    const K = this.c.codebooks, [lo, hi] = this.c.limits.codec_codes;
    if (dims.length !== 3 || dims[0] < 1 || dims[1] !== K || dims[2] < 1 || codes.length !== dims[0] * K * dims[2])
      throw new RangeError(`codes to decode must be [B, ${K}, T] with B, T >= 1, got [${dims}]`);
    for (const x of codes) if (x < lo || x > hi)
      throw new RangeError(`codes must lie in [${lo}, ${hi}] to decode (finished tokens; ${hi + 1} is the mask id), ` +
        `found ${x}`);
    const t = new this.ort.Tensor("int64", BigInt64Array.from(codes, BigInt), dims);
    return (await this.sessions.codec_decode.run({ codes: t })).audio.data;
  }
}

/** One conformance trace entry (export/conformance.py): re-masked units and scores per row, a few raw logits. */
function traceStep(window, stage, step, nMask, picked, scores, logits, B, units, [N, T, V]) {
  const perRow = (a, f) => Array.from({ length: B }, (_, b) => f(Array.from(a.subarray(b * units, (b + 1) * units))));
  const probes = [];
  for (const r of [...new Set([0, N - 1])]) for (const t of [...new Set([0, T - 1])]) {
    let arg = 0;
    for (let v = 1; v < V; v++) if (logits[(r * T + t) * V + v] > logits[(r * T + t) * V + arg]) arg = v;
    for (const v of [...new Set([0, arg])].sort((a, b) => a - b)) probes.push([r, t, v, logits[(r * T + t) * V + v]]);
  }
  return { window, stage, step, n_mask: nMask, remasked: perRow(picked, (r) => r.flatMap((x, u) => (x ? [u] : []))),
           scores: perRow(scores, (r) => r), logits: probes };
}

function checkPrompt(pc, B, K, V, T) {
  if (!Array.isArray(pc) || (pc.length !== 1 && pc.length !== B))
    throw new UsageError(`prompt codes hold ${pc?.length} items for ${B} prompts; give one or ${B}`);
  const P = pc[0]?.[0]?.length ?? 0;
  for (const item of pc) {
    if (!Array.isArray(item) || item.length !== K || item.some((r) => !Array.isArray(r) || r.length !== P))
      throw new UsageError(`prompt codes must be [B][${K}][P] with one P`);
    for (const r of item) for (const x of r) if (!Number.isInteger(x) || x < 0 || x >= V)
      throw new UsageError(`prompt codes must be integers in [0, ${V}), found ${x}`);
  }
  if (P >= T) throw new UsageError(`the prompt (${P} frames) must be shorter than the generation (${T} frames)`);
  return P;
}

/** Guided logits g [V], the position's uniform u -> (token, its probability under softmax(g / temperature));
 *  float32 as the engine. */
function choose(g, temp, s, u) {
  const V = g.length;
  const z = new Float32Array(V);
  let max = -Infinity, arg = 0;
  for (let v = 0; v < V; v++) {
    z[v] = f32(g[v] / temp);
    if (g[v] > max) { max = g[v]; arg = v; }  // first index among equals, as torch.argmax
  }
  let zmax = -Infinity;
  for (let v = 0; v < V; v++) if (z[v] > zmax) zmax = z[v];
  const probs = new Float32Array(V);
  let sum = 0;
  for (let v = 0; v < V; v++) { probs[v] = f32(Math.exp(f32(z[v] - zmax))); sum += probs[v]; }
  const total = f32(sum);
  for (let v = 0; v < V; v++) probs[v] = f32(probs[v] / total);
  if (s.greedy) return [arg, probs[arg]];
  if (s.top_p > 0) {  // nucleus as a threshold (engine.sampling.top_p_keep), found without sorting
    const threshold = nucleusThreshold(probs, s.top_p);
    const tok = inverseCdf(probs.map((p) => (p >= threshold ? p : 0)), u);
    return [tok, probs[tok]];
  }
  if (s.top_k > 0) {  // renormalised top-k: the renormalised probability scores the spans
    const kth = kthLargest(probs, s.top_k);
    const kept = probs.map((p) => (p >= kth ? p : 0));
    const z2 = f32(kept.reduce((a, x) => a + x, 0));
    for (let v = 0; v < V; v++) kept[v] = f32(kept[v] / z2);
    const tok = inverseCdf(kept, u);
    return [tok, kept[tok]];
  }
  const tok = inverseCdf(probs, u);
  return [tok, probs[tok]];
}

/** Three-way partition of w[lo, hi) around w[mid]: [lo, g) > pivot, [g, e) == pivot, [e, hi) < pivot, in place.
 *  -> [pivot, g, e, mass of the greater part, mass of the equal part]. */
function partition(w, lo, hi) {
  const pivot = w[(lo + hi) >> 1];
  let g = lo, i = lo, e = hi, greater = 0, equal = 0;
  while (i < e) {
    const x = w[i];
    if (x > pivot) { w[i] = w[g]; w[g++] = x; i++; greater += x; } else if (x < pivot) { w[i] = w[--e]; w[e] = x; } else {
      i++; equal += x;
    }
  }
  return [pivot, g, e, greater, equal];
}

/** The nucleus threshold p*: the smallest probability whose strictly-more-probable mass is <= topP. Keeping p >= p*
 *  is the manifest's rule (sorted exclusive cumsum <= top_p, ties included), found by quickselect in O(V) expected:
 *  each round keeps the part of the candidates that holds p*, and the mass of the values above them. */
export function nucleusThreshold(probs, topP) {
  const w = Float32Array.from(probs);
  let lo = 0, hi = w.length, above = 0;  // invariant: above (the mass over every candidate) <= topP
  for (;;) {
    const [pivot, g, e, greater, equal] = partition(w, lo, hi);
    if (above + greater > topP) hi = g;  // the pivot is cut: p* is a greater value
    else if (e === hi || above + greater + equal > topP) return pivot;  // kept, and nothing smaller is
    else { above += greater + equal; lo = e; }
  }
}

/** The k-th largest value (1 <= k <= length) by quickselect, no sort. */
export function kthLargest(probs, k) {
  const w = Float32Array.from(probs);
  let lo = 0, hi = w.length;
  for (;;) {
    const [pivot, g, e] = partition(w, lo, hi);
    if (k <= g - lo) hi = g;
    else if (k <= e - lo) return pivot;
    else { k -= e - lo; lo = e; }
  }
}

/** The first index whose cumulative weight exceeds u · total. */
function inverseCdf(w, u) {
  let total = 0;
  for (const x of w) total += x;
  const target = u * total;
  let acc = 0;
  for (let i = 0; i < w.length; i++) { acc += w[i]; if (acc > target) return i; }
  return w.length - 1;
}

function chunkScore(probs, start, span, scoring) {
  if (scoring === "max") {
    let m = -Infinity;
    for (let j = 0; j < span; j++) m = Math.max(m, probs[start + j]);
    return f32(1 - m);
  }
  let acc = 0;
  for (let j = 0; j < span; j++) acc = f32(acc + f32(-Math.log(probs[start + j])));
  return acc;
}

/** Per row, the n highest scores (ties: lower index first) -> Uint8Array [B, C]. */
function topN(scores, B, C, n) {
  const out = new Uint8Array(B * C);
  for (let b = 0; b < B; b++) {
    const order = rankDesc(scores, b * C, C);
    for (let i = 0; i < n; i++) out[b * C + order[i]] = 1;
  }
  return out;
}

function rankDesc(a, offset, n) {
  const idx = Array.from({ length: n }, (_, i) => i);
  return idx.sort((i, j) => a[offset + j] - a[offset + i] || i - j);
}

/** stride1 (manifest spans.stride1): scores [B, T] -> Uint8Array [B, T] frames to re-mask. */
function leastProbableSpans(scores, B, T, nTarget, span) {
  const W = T - span + 1;
  const out = new Uint8Array(B * T);
  const m = Math.max(nTarget, span);
  for (let b = 0; b < B; b++) {
    const win = new Float32Array(W);
    for (let w = 0; w < W; w++) {
      let acc = 0;
      for (let j = 0; j < span; j++) acc = f32(acc + scores[b * T + w + j]);
      win[w] = acc;
    }
    const order = rankDesc(win, 0, W);
    const cover = (u) => {
      const mask = new Uint8Array(T);
      for (let i = 0; i < u; i++) mask.fill(1, order[i], order[i] + span);
      return mask;
    };
    let lo = Math.floor(m / span), hi = m - span + 1;
    let mid = roundHalfEven((lo + hi) / 2);
    let mask = cover(mid);
    while (lo < mid && mid < hi) {
      mask = cover(mid);
      if (mask.reduce((a, x) => a + x, 0) > m) hi = mid; else lo = mid;
      mid = roundHalfEven((lo + hi) / 2);
    }
    out.set(mask, b * T);
  }
  return out;
}

/** Noise of a sampled run: (B, T) -> one step's uniforms, Float64Array [B, T]. From a generator, row by row: */
function seededNoise(rand) {
  return (B, T) => Float64Array.from({ length: B * T }, rand);
}

/** ... or given, nested [S][B][T] (a conformance vector's): one step per call, in order; `left()` counts the rest. */
function givenNoise(uniforms) {
  if (!Array.isArray(uniforms)) throw new UsageError("uniforms must be nested [S][B][T] numbers in [0, 1)");
  let used = 0;
  const next = (B, T) => {
    if (used >= uniforms.length) throw new UsageError("the uniforms ran out: give one [B][T] per decoding step");
    const step = uniforms[used];
    if (!Array.isArray(step) || step.length !== B || step.some((r) => !Array.isArray(r) || r.length !== T))
      throw new UsageError(`uniforms of step ${used} must be [${B}][${T}], the positions that step samples`);
    const flat = Float64Array.from(step.flat());
    if (flat.some((x) => !(x >= 0 && x < 1))) throw new UsageError(`uniforms of step ${used} must lie in [0, 1)`);
    used++;
    return flat;
  };
  next.left = () => uniforms.length - used;
  return next;
}

/** A small seeded PRNG (uniform in [0, 1)); sampled runs match the engine in distribution, not token for token. */
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ------------------------------------------------------------------------------------------------ audio out

/** Peak-normalised to 0.99 (magnet generate's default), 16-bit PCM mono WAV. */
export function wavBytes(samples, sampleRate) {
  let peak = 0;
  for (const x of samples) peak = Math.max(peak, Math.abs(x));
  const gain = peak > 0 ? 0.99 / peak : 1;
  const bytes = new Uint8Array(44 + 2 * samples.length);  // Node writes it as is; a page wraps it in a Blob
  const v = new DataView(bytes.buffer);
  const text = (at, str) => [...str].forEach((ch, i) => v.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); v.setUint32(4, 36 + 2 * samples.length, true); text(8, "WAVE");
  text(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, sampleRate, true); v.setUint32(28, 2 * sampleRate, true); v.setUint16(32, 2, true);
  v.setUint16(34, 16, true); text(36, "data"); v.setUint32(40, 2 * samples.length, true);
  samples.forEach((x, i) => v.setInt16(44 + 2 * i, Math.max(-32768, Math.min(32767, Math.round(x * gain * 32767))), true));
  return bytes;
}

// ------------------------------------------------------------------------------------------------ CLI

const USAGE = `usage: node magnet.mjs --model EXPORT_DIR [options] PROMPT [PROMPT ...]
  --steps A,B,..   decoding steps per codebook    --greedy               argmax decoding (deterministic)
  --temperature X  --top-p X  --top-k N           --cfg MAX,MIN | C      guidance, annealed or constant
  --no-anneal-temp --span-arrangement nonoverlap|stride1   --span-scoring max|prod
  --duration SEC   --seed N   -o/--out FILE.wav | DIR   --tokens-out FILE.json ([B][K][T] ints)
  --prompt-codes FILE.json ([B or 1][K][P] ints to continue)   --threads N   --quiet
  --context SEC    past the segment: seconds each window continues from (manifest client.longform)
Defaults: the export's manifest (client.defaults).`;

export function parseArgs(argv) {
  const out = { prompts: [], settings: {}, output: null, tokensOut: null, model: null, threads: 0, quiet: false,
                promptCodes: null };
  const num = (flag, v, int = false) => {
    const x = Number(v);
    if (v === undefined || v === "" || Number.isNaN(x) || (int && !Number.isInteger(x)))
      throw new UsageError(`${flag} needs ${int ? "an integer" : "a number"}, got ${v}`);
    return x;
  };
  const list = (flag, v, int) => (v ?? "").split(",").map((x) => num(flag, x, int));
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => { if (i + 1 >= argv.length) throw new UsageError(`${a} needs a value`); return argv[++i]; };
    switch (a) {
      case "--model": out.model = next(); break;
      case "--steps": out.settings.steps = list(a, next(), true); break;
      case "--greedy": out.settings.greedy = true; break;
      case "--temperature": out.settings.temperature = num(a, next()); break;
      case "--top-p": out.settings.top_p = num(a, next()); break;
      case "--top-k": out.settings.top_k = num(a, next(), true); break;
      case "--cfg": out.settings.cfg = list(a, next(), false); break;
      case "--no-anneal-temp": out.settings.anneal_temp = false; break;
      case "--span-arrangement": out.settings.span_arrangement = next(); break;
      case "--span-scoring": out.settings.span_scoring = next(); break;
      case "--duration": out.settings.duration = num(a, next()); break;
      case "--seed": out.settings.seed = num(a, next(), true); break;
      case "--context": out.settings.context = num(a, next()); break;
      case "-o": case "--out": case "--output": out.output = next(); break;
      case "--tokens-out": out.tokensOut = next(); break;
      case "--prompt-codes": out.promptCodes = next(); break;
      case "--threads": out.threads = num(a, next(), true); break;
      case "--quiet": out.quiet = true; break;
      case "-h": case "--help": out.help = true; break;
      default:
        if (a.startsWith("-") && a !== "-") throw new UsageError(`unknown option ${a}`);
        out.prompts.push(a);
    }
  }
  if (!out.help && !out.model) throw new UsageError("--model EXPORT_DIR is required (a `magnet export` folder)");
  if (!out.help && out.prompts.length === 0) throw new UsageError("give at least one PROMPT");
  return out;
}

export function nested(codes, [B, K, T]) {
  return Array.from({ length: B }, (_, b) => Array.from({ length: K }, (_, k) =>
    Array.from(codes.subarray((b * K + k) * T, (b * K + k + 1) * T))));
}

export async function main(argv) {
  let args;
  try {
    args = parseArgs(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`magnet.mjs: error: ${e.message} (see --help)\n`);
    return 2;
  }
  if (args.help) { process.stdout.write(USAGE + "\n"); return 0; }
  try {
    const client = await MagnetClient.load(args.model, { threads: args.threads });
    resolveSettings(client, args.settings);  // refuse bad settings before any work
    const promptCodes = args.promptCodes ? JSON.parse(fs.readFileSync(args.promptCodes, "utf8")) : null;
    const progress = args.quiet ? null : (d, n) => process.stderr.write(`\rstep ${d}/${n}` + (d === n ? "\n" : ""));
    const { codes, dims } = await client.generate(args.prompts, args.settings, { promptCodes, progress });
    if (args.tokensOut) fs.writeFileSync(args.tokensOut, JSON.stringify(nested(codes, dims)) + "\n");
    const audio = await client.decode(codes, dims);
    const [B] = dims, n = audio.length / B, rate = client.c.sample_rate;
    const target = args.output ?? (B === 1 ? "out.wav" : "out");
    const oneFile = B === 1 && target.endsWith(".wav");  // otherwise a folder, for one prompt as for several
    const files = oneFile ? [target] : Array.from({ length: B }, (_, b) => path.join(target, `${b}.wav`));
    if (!oneFile) fs.mkdirSync(target, { recursive: true });
    files.forEach((f, b) => fs.writeFileSync(f, wavBytes(audio.subarray(b * n, (b + 1) * n), rate)));
    process.stdout.write(`wrote ${files.join(", ")} (${dims[2]} frames, ${(n / rate).toFixed(2)} s at ${rate} Hz)\n`);
    return 0;
  } catch (e) {
    const usage = e instanceof UsageError;
    process.stderr.write(`magnet.mjs: error: ${String(e.message).split("\n")[0]}\n`);
    return usage ? 2 : 1;
  }
}

if (NODE && import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  process.exitCode = await main(process.argv.slice(2));
}
