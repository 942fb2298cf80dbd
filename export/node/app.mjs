// The page's logic (index.html): the form -> the CLI's own argument parser and settings checks (so the page refuses
// exactly what `node magnet.mjs` refuses, in the same one line) -> MagnetClient (magnet.mjs) -> <audio> and a WAV.
// The export folder is the page's folder. ?backend=auto|wasm|webgpu&threads=N pick the runtime (a reload: WASM
// threads are fixed once onnxruntime-web starts). window.magnetPage is what tests and benchmarks drive.
import { MagnetClient, UsageError, nested, parseArgs, resolveSettings, wavBytes } from "./magnet.mjs";
import { run as conformance } from "./conformance.mjs";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const backend = query.get("backend") ?? "auto";
const threads = Number(query.get("threads") ?? 0);
const page = { state: "loading", client: null, progress: [], last: null, error: "" };
window.magnetPage = page;

function fail(e) {
  page.error = String(e?.message ?? e).split("\n")[0];
  $("error").textContent = page.error;
  page.state = page.client ? "ready" : "error";
  if (!(e instanceof UsageError || e instanceof RangeError || e instanceof TypeError)) console.error(e);
}

/** The form as `magnet.mjs` flags (empty fields: the export's defaults) plus the prompt. */
function argv() {
  const out = ["--model", "."];
  for (const el of document.querySelectorAll("[data-flag]")) {
    if (el.type === "checkbox") {
      if (el.checked !== ("invert" in el.dataset)) out.push(el.dataset.flag);
    } else if (el.value.trim() !== "") out.push(el.dataset.flag, el.value.trim());
  }
  return [...out, $("prompt").value.trim()];
}

/** Step progress: the bar moves, and the callback yields so the page paints between steps. */
function progress(done, total) {
  page.progress.push([done, total]);
  $("progress").max = total;
  $("progress").value = done;
  $("step").textContent = `step ${done}/${total}`;
  return new Promise((resolve) => setTimeout(resolve, 0));
}

async function generate(event) {
  event?.preventDefault();
  $("error").textContent = page.error = "";
  $("result").hidden = true;
  page.progress = [];
  try {
    const args = parseArgs(argv());
    if (args.prompts.length !== 1 || args.prompts[0] === "") throw new UsageError("enter a prompt");
    const client = page.client;
    resolveSettings(client, args.settings);  // refuse bad settings before any work
    page.state = "running";
    $("generate").disabled = true;
    const t0 = performance.now();
    const { codes, dims } = await client.generate(args.prompts, args.settings, { progress });
    const audio = await client.decode(codes, dims);
    const seconds = (performance.now() - t0) / 1000;
    const rate = client.c.sample_rate;
    const wav = wavBytes(audio, rate);
    const url = URL.createObjectURL(new Blob([wav], { type: "audio/wav" }));
    $("audio").src = url;
    $("download").href = url;
    $("timing").textContent = `${(audio.length / rate).toFixed(2)} s of audio (${dims[2]} frames) in ` +
      `${seconds.toFixed(2)} s on ${describe(client.runtime)}`;
    $("result").hidden = false;
    const rms = Math.sqrt(audio.reduce((a, x) => a + x * x, 0) / audio.length);
    page.last = { codes: nested(codes, dims), samples: audio.length, rate, rms, wav_bytes: wav.length, seconds };
    page.state = "done";
  } catch (e) {
    fail(e);
  } finally {
    $("generate").disabled = !page.client;
  }
}

function describe(rt) {
  return rt.backend === "webgpu" ? "WebGPU"
    : `WASM, ${rt.threads} thread${rt.threads === 1 ? "" : "s"}${rt.isolated ? " (cross-origin isolated)" : ""}`;
}

/** For tests and benchmarks: the client's own calls, no form. */
page.generate = async (prompts, settings, promptCodes = null) => {
  const t0 = performance.now();
  const { codes, dims } = await page.client.generate(prompts, settings, { promptCodes });
  const audio = await page.client.decode(codes, dims);
  return { codes: nested(codes, dims), samples: audio.length, seconds: (performance.now() - t0) / 1000 };
};
page.conformance = () => conformance(".", "./conformance", page.client);

try {
  $("backend").value = backend;
  $("threads").value = String(threads);
  for (const id of ["backend", "threads"])
    $(id).addEventListener("change", () => {
      query.set(id, $(id).value);
      location.search = query.toString();
    });
  const client = await MagnetClient.load(".", { backend, threads });
  const d = client.c.defaults;
  $("duration").value = d.duration;
  $("steps").value = d.steps.join(",");
  $("temperature").value = d.temperature;
  $("cfg").value = d.cfg.join(",");
  $("top_p").value = d.top_p;
  $("top_k").value = d.top_k;
  $("greedy").checked = d.greedy;
  $("anneal_temp").checked = d.anneal_temp;
  $("span_arrangement").value = d.span_arrangement;
  $("span_scoring").value = d.span_scoring;
  const m = client.manifest;
  $("model").textContent = `model: ${m.source?.model ?? "?"} (${m.dtype}${m.quantization ? ", int8" : ""}), ` +
    `${client.c.sample_rate} Hz, up to ${client.c.limits.frames[1] / client.c.frame_rate} s per segment`;
  $("runtime").textContent = `runtime: ${describe(client.runtime)}` + (client.runtime.note ? ` (${client.runtime.note})` : "");
  page.client = client;
  page.runtime = client.runtime;
  page.state = "ready";
  $("generate").disabled = false;
  $("form").addEventListener("submit", generate);
} catch (e) {
  $("model").textContent = "the model did not load";
  fail(e);
}
