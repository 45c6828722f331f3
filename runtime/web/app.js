// The browser host: load the served vgg-onnx model with onnxruntime-web (WebAssembly, SIMD;
// threads when the page is cross-origin isolated), then classify the image the user picks or
// drops by dense evaluation at the model's test scales with mirrors (docs/protocol.md §3), and
// draw the top class's score map over it. The checks and the arithmetic are vgg-core.js's, the
// Node host's own (window.vggCore); decoding is the browser's.
import * as ort from './ort/ort.wasm.min.mjs';

const core = window.vggCore;
const MODEL_URL = 'model.onnx';
const SIDECAR_URL = 'model.json';
const HEAT_MAX_WIDTH = 640; // the heatmap canvas's largest width, in pixels
const $ = (id) => document.getElementById(id);

const state = { session: null, info: null, busy: false };

function setStatus(text, done, total) {
  $('status').textContent = text;
  $('progress').max = total || 1;
  $('progress').value = done || 0;
}

function showError(message) { // one line, as the other hosts print it
  $('error').textContent = message;
  $('error').hidden = !message;
}

function finish(stateName) {
  document.body.dataset.state = stateName;
  document.body.dataset.runs = String(Number(document.body.dataset.runs) + 1);
}

// ---- the model -----------------------------------------------------------------------------

// The response's bytes, with the download's progress shown.
async function download(url, label) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: cannot read: HTTP ${response.status}`);
  const total = Number(response.headers.get('Content-Length')) || 0;
  if (!total) return new Uint8Array(await response.arrayBuffer()); // length unknown: no progress to show
  if (total > core.MAX_MODEL_BYTES) throw new Error(`${url}: file of ${total} bytes exceeds the size limit of ${core.MAX_MODEL_BYTES} bytes`);
  const bytes = new Uint8Array(total), reader = response.body.getReader();
  let done = 0;
  for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
    if (done + chunk.value.length > total) throw new Error(`${url}: the file changed while it was read`);
    bytes.set(chunk.value, done);
    done += chunk.value.length;
    setStatus(`${label}: ${(done / 2 ** 20).toFixed(0)} of ${(total / 2 ** 20).toFixed(0)} MiB`, done, total);
  }
  return bytes.subarray(0, done);
}

async function fetchSidecar() { // the JSON export writes beside the model, when the .onnx has none
  try {
    const response = await fetch(SIDECAR_URL);
    return response.ok ? await response.json() : null;
  } catch {
    return null;
  }
}

function configureWasm() {
  ort.env.wasm.wasmPaths = new URL('ort/', document.baseURI).href;
  // threads need SharedArrayBuffer, which browsers give cross-origin isolated pages only
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.max(1, Math.min(navigator.hardwareConcurrency || 1, 8)) : 1;
  return ort.env.wasm.numThreads;
}

async function loadModel() {
  const start = performance.now(), threads = configureWasm();
  const bytes = await download(MODEL_URL, 'Downloading the model');
  const props = core.readMetadataProps(bytes);
  const info = core.modelInfo(MODEL_URL, props, core.hasMetadata(props) ? null : await fetchSidecar());
  setStatus('Compiling the model (WebAssembly)…', 0, 1);
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
  } catch (e) {
    throw new Error(`${MODEL_URL}: ONNX Runtime cannot load the graph: ${String(e.message || e).split('\n')[0]}`);
  }
  const probs = (session.outputMetadata || []).find((o) => o.name === 'probs');
  core.checkClassCount(MODEL_URL, probs && Array.isArray(probs.shape) ? probs.shape[1] : undefined, info);
  const seconds = (performance.now() - start) / 1000;
  Object.assign(state, { session, info, loadSeconds: seconds, threads });
  $('model').textContent = `${info.config ? `VGG-${info.config}, ` : ''}${info.classes.length} classes, `
    + `test scales ${info.testScales.join(', ')}; loaded in ${seconds.toFixed(1)} s, `
    + `${threads} WebAssembly thread${threads > 1 ? 's' : ''}${self.crossOriginIsolated ? '' : ' (page not cross-origin isolated)'}`;
}

// ---- the image -----------------------------------------------------------------------------

// docs/decoding.md: size bound and header checks before decoding, then the browser's decoder
// (EXIF orientation applied, no colour management, alpha dropped). Returns the RGB image and a
// bitmap to draw.
async function decode(file) {
  if (file.size > core.MAX_IMAGE_BYTES) throw new core.ImageError(`file of ${file.size} bytes exceeds the size limit of ${core.MAX_IMAGE_BYTES} bytes`);
  const bytes = new Uint8Array(await file.arrayBuffer());
  core.checkImageBytes(bytes, { maxPixels: core.DEFAULT_MAX_PIXELS, scales: state.info.testScales });
  let bitmap;
  try {
    bitmap = await createImageBitmap(new Blob([bytes]), { imageOrientation: 'from-image', colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  } catch (e) {
    throw new Error(`cannot decode image (${String(e.message || e).split('\n')[0]})`);
  }
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext('2d', { colorSpace: 'srgb' });
  context.drawImage(bitmap, 0, 0);
  const { data } = context.getImageData(0, 0, bitmap.width, bitmap.height);
  return { image: core.rgbaToRgb(data, bitmap.width, bitmap.height), bitmap };
}

const nextFrame = () => new Promise((resolve) => setTimeout(resolve, 0)); // lets the progress paint

// Dense evaluation; resolves to { probs, heat: the first view's score map at the largest scale }.
async function evaluate(image) {
  const { session, info } = state, scales = info.testScales, largest = Math.max(...scales);
  let heat = null;
  const runViews = async ({ data, dims }, q) => {
    const outputs = await session.run({ image: new ort.Tensor('float32', data, dims) });
    if (q === largest) {
      const [, classes, h, w] = outputs.scores.dims;
      heat = { data: outputs.scores.data.slice(0, classes * h * w), classes, h, w };
    }
    return outputs.probs;
  };
  const onScale = async (i, q) => {
    setStatus(`Scale ${q} (${i + 1} of ${scales.length}), with its mirror image…`, i, scales.length);
    await nextFrame();
  };
  const probs = await core.denseEvaluate(runViews, image, { scales, flip: true, numClasses: info.classes.length, onScale });
  return { probs, heat };
}

// ---- the result ----------------------------------------------------------------------------

// OpenCV's COLORMAP_JET, near enough: blue (low) through green to red (high).
function jet(v) {
  const c = (x) => Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - x))));
  return [c(3), c(2), c(1)];
}

// The class's map stretched to the canvas (bilinear, pixel centres aligned, as cv2.resize),
// coloured over this image's own score range, blended half and half over the image.
function drawHeat(bitmap, heat, classIndex) {
  const canvas = $('heatmap'), scale = Math.min(1, HEAT_MAX_WIDTH / bitmap.width);
  const width = Math.max(1, Math.round(bitmap.width * scale)), height = Math.max(1, Math.round(bitmap.height * scale));
  Object.assign(canvas, { width, height });
  const context = canvas.getContext('2d');
  context.drawImage(bitmap, 0, 0, width, height);
  const picture = context.getImageData(0, 0, width, height);
  const map = heat.data.subarray(classIndex * heat.h * heat.w, (classIndex + 1) * heat.h * heat.w);
  const sample = (x, y) => map[Math.min(heat.h - 1, Math.max(0, y)) * heat.w + Math.min(heat.w - 1, Math.max(0, x))];
  const values = new Float32Array(width * height);
  for (let y = 0; y < height; y++) {
    const fy = Math.max(0, (y + 0.5) * heat.h / height - 0.5), y0 = Math.floor(fy), dy = fy - y0;
    for (let x = 0; x < width; x++) {
      const fx = Math.max(0, (x + 0.5) * heat.w / width - 0.5), x0 = Math.floor(fx), dx = fx - x0;
      values[y * width + x] = (1 - dy) * ((1 - dx) * sample(x0, y0) + dx * sample(x0 + 1, y0))
        + dy * ((1 - dx) * sample(x0, y0 + 1) + dx * sample(x0 + 1, y0 + 1));
    }
  }
  let low = Infinity, high = -Infinity;
  for (const v of values) { low = Math.min(low, v); high = Math.max(high, v); }
  for (let i = 0; i < values.length; i++) {
    const colour = jet(high > low ? (values[i] - low) / (high - low) : 0);
    for (let c = 0; c < 3; c++) picture.data[4 * i + c] = Math.round((picture.data[4 * i + c] + colour[c]) / 2);
  }
  context.putImageData(picture, 0, 0);
  return [low, high];
}

function showResult(record, bitmap, heat) {
  const best = record.top_k[0], classIndex = state.info.classes.findIndex((c) => c.index === best.index);
  const [low, high] = drawHeat(bitmap, heat, classIndex);
  $('heat-label').textContent = `${best.name} (class score)`;
  $('heat-low').textContent = low.toPrecision(3);
  $('heat-high').textContent = high.toPrecision(3);
  const rows = record.top_k.map((entry, i) => {
    const row = document.createElement('tr');
    for (const text of [String(i + 1), entry.name, `${(100 * entry.prob).toFixed(2)} %`]) {
      row.appendChild(document.createElement('td')).textContent = text;
    }
    return row;
  });
  $('top5').tBodies[0].replaceChildren(...rows);
  $('timing').textContent = `${record.seconds.toFixed(2)} s for ${record.scales.length} scales with mirrors`;
  $('result').dataset.record = JSON.stringify(record); // the result in `vgg-onnx infer --format json`'s schema
  $('result').hidden = false;
}

async function classifyFile(file) {
  if (state.busy || !state.session) return;
  state.busy = true;
  document.body.dataset.state = 'busy';
  showError('');
  const start = performance.now();
  try {
    const { image, bitmap } = await decode(file);
    const { probs, heat } = await evaluate(image);
    const seconds = Math.round(performance.now() - start) / 1000;
    const record = { path: file.name, top_k: core.topK(probs, state.info.classes), method: 'dense',
      scales: state.info.testScales, models: [MODEL_URL], seconds };
    showResult(record, bitmap, heat);
    setStatus(`${file.name}: done in ${seconds.toFixed(2)} s`, 1, 1);
    finish('done');
  } catch (e) {
    showError(`${file.name}: ${String(e.message || e).split('\n')[0]}`);
    setStatus('Ready for another image', 0, 1);
    finish('error');
  } finally {
    state.busy = false;
  }
}

function wireInput() {
  const input = $('file'), drop = $('drop');
  input.disabled = false;
  input.addEventListener('change', () => { if (input.files[0]) classifyFile(input.files[0]).then(() => { input.value = ''; }); });
  for (const name of ['dragenter', 'dragover']) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    if (e.dataTransfer.files[0]) classifyFile(e.dataTransfer.files[0]);
  });
}

loadModel().then(() => {
  wireInput();
  setStatus('Ready: pick or drop an image', 0, 1);
  document.body.dataset.loadSeconds = String(state.loadSeconds);
  document.body.dataset.threads = String(state.threads);
  document.body.dataset.state = 'ready';
}, (e) => {
  showError(String(e.message || e).split('\n')[0]);
  setStatus('The model did not load', 0, 1);
  document.body.dataset.state = 'failed';
});
