#!/usr/bin/env node
// classify: multi-scale dense evaluation of a vgg-onnx model from Node.js (PAPER.md §3, §5).
//
//   node classify.js MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip]
//
// Prints a JSON array in the schema of `vgg-onnx infer --format json`. sharp decodes the image,
// the rescale is OpenCV's (INTER_AREA shrinking, INTER_LINEAR enlarging) written out below so
// that every host computes the same pixels, and onnxruntime-node runs the .onnx file. The
// model's metadata (classes, test scales) is read from the file's metadata_props, or from the
// JSON file export writes beside it.
// As a module it gives the steps: loadModel, loadRgb, rescale, toTensor, classify, topK.
'use strict';

const fs = require('fs');
const ort = require('onnxruntime-node');
const sharp = require('sharp');

const USAGE = 'usage: classify.js MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip]';
const TOP_K = 5;

class UsageError extends Error {}

// ---- the model's metadata ------------------------------------------------------------------

// An .onnx file is a protobuf ModelProto; metadata_props is its field 14, each entry a message
// {1: key, 2: value}. Walking the top-level fields skips the graph without parsing it.
function readVarint(bytes, pos) {
  let value = 0;
  for (let shift = 0; pos < bytes.length && shift < 64; shift += 7) {
    const byte = bytes[pos++];
    value += (byte & 0x7f) * 2 ** shift;
    if (!(byte & 0x80)) return [value, pos];
  }
  return [NaN, bytes.length];
}

function* fields(bytes) { // [field number, wire type, payload bytes or null]
  let pos = 0;
  while (pos < bytes.length) {
    let tag, length;
    [tag, pos] = readVarint(bytes, pos);
    const field = Math.floor(tag / 8), wireType = tag % 8;
    if (wireType === 0) [, pos] = readVarint(bytes, pos);
    else if (wireType === 1 || wireType === 5) pos += wireType === 1 ? 8 : 4;
    else if (wireType === 2) {
      [length, pos] = readVarint(bytes, pos);
      if (!(pos + length <= bytes.length)) return;
      yield [field, wireType, bytes.subarray(pos, pos + length)];
      pos += length;
      continue;
    } else return; // not a protobuf we understand: no metadata
    yield [field, wireType, null];
  }
}

function readMetadataProps(onnxBytes) {
  const props = {};
  for (const [field, , entry] of fields(onnxBytes)) {
    if (field !== 14 || !entry) continue;
    const kv = ['', ''];
    for (const [f, , text] of fields(entry)) if ((f === 1 || f === 2) && text) kv[f - 1] = text.toString('utf8');
    // values are strings, structured ones JSON: decode them into the shape of the JSON sidecar
    try { props[kv[0]] = JSON.parse(kv[1]); } catch { props[kv[0]] = kv[1]; }
  }
  return props;
}

function readModelInfo(modelPath, onnxBytes) {
  let meta = readMetadataProps(onnxBytes);
  const sidecar = modelPath.endsWith('.onnx') ? modelPath.slice(0, -5) + '.json' : modelPath + '.json';
  if (!Object.keys(meta).length && fs.existsSync(sidecar)) { // export also writes the metadata there
    try { meta = JSON.parse(fs.readFileSync(sidecar, 'utf8')); } catch { meta = {}; }
  }
  if (String(meta.vgg_onnx_format) !== '1') {
    throw new Error(`${modelPath}: no vgg-onnx metadata (not exported by vgg-onnx export)`);
  }
  const { classes, test_scales: testScales, crop_size: cropSize } = meta;
  if (!Array.isArray(classes) || !Array.isArray(testScales) || !Number.isInteger(cropSize)) {
    throw new Error(`${modelPath}: malformed vgg-onnx metadata (classes, test_scales or crop_size)`);
  }
  return { classes, testScales, cropSize };
}

// The graph and its metadata: { session, info: { classes, testScales, cropSize } }.
async function loadModel(modelPath) {
  let onnxBytes;
  try {
    onnxBytes = fs.readFileSync(modelPath);
  } catch (e) {
    throw new Error(`${modelPath}: cannot read: ${e.code === 'ENOENT' ? 'No such file or directory' : e.message}`);
  }
  const info = readModelInfo(modelPath, onnxBytes);
  try {
    return { session: await ort.InferenceSession.create(onnxBytes), info };
  } catch (e) {
    throw new Error(`${modelPath}: ONNX Runtime cannot load the graph: ${e.message.split('\n')[0]}`);
  }
}

// ---- preprocessing (PAPER.md §5) -----------------------------------------------------------

// 8-bit RGB: EXIF orientation applied, alpha dropped, grayscale (and CMYK) to three channels,
// 16-bit samples scaled to 8 bits as round(v*255/65535); an embedded ICC profile is kept, not
// applied, as OpenCV does.
async function loadRgb(path) {
  let bytes;
  try {
    bytes = fs.readFileSync(path);
  } catch (e) {
    throw new Error(`cannot read: ${e.code === 'ENOENT' ? 'No such file or directory' : e.message}`);
  }
  try {
    const sixteenBit = (await sharp(bytes).metadata()).depth === 'ushort';
    let { data, info } = await sharp(bytes).rotate().keepIccProfile().removeAlpha()
      .toColourspace(sixteenBit ? 'rgb16' : 'srgb').raw({ depth: sixteenBit ? 'ushort' : 'uchar' })
      .toBuffer({ resolveWithObject: true });
    if (sixteenBit) {
      const wide = new Uint16Array(data.buffer, data.byteOffset, data.length / 2);
      data = Uint8Array.from(wide, (v) => Math.floor((v * 255 + 32767) / 65535));
    }
    return { data, width: info.width, height: info.height };
  } catch (e) {
    throw new Error(`cannot decode image (${e.message.split('\n')[0]})`);
  }
}

// Isotropic rescale: the shorter side becomes q, the longer floor(L*q/short + 1/2), in integers.
function rescaledSize(width, height, q) {
  if (width <= height) return [q, Math.floor((2 * height * q + width) / (2 * width))];
  return [Math.floor((2 * width * q + height) / (2 * height)), q];
}

// OpenCV's resize, one axis at a time: an output pixel is a weighted sum of source pixels (taps).
function linearTaps(src, dst) { // INTER_LINEAR: pixel centres aligned, edges clamped, 11-bit weights
  const scale = src / dst;
  return Array.from({ length: dst }, (_, d) => {
    let f = Math.fround((d + 0.5) * scale - 0.5), s = Math.floor(f);
    f -= s;
    if (s < 0) [s, f] = [0, 0];
    if (s >= src - 1) [s, f] = [src - 1, 0];
    const w = Math.round(f * 2048) / 2048;
    return w ? [[s, 1 - w], [s + 1, w]] : [[s, 1]];
  });
}

function areaTaps(src, dst) { // INTER_AREA (shrinking): the mean over the source area covered
  const scale = src / dst;
  return Array.from({ length: dst }, (_, d) => {
    const start = d * scale, end = Math.min(start + scale, src), taps = [];
    for (let s = Math.floor(start); s < end; s++) {
      const overlap = Math.min(s + 1, end) - Math.max(s, start);
      if (overlap > 1e-3) taps.push([s, overlap / (end - start)]);
    }
    return taps;
  });
}

function rescale(image, q) {
  const { data, width: w, height: h } = image;
  const [width, height] = rescaledSize(w, h, q);
  if (width === w && height === h) return image;
  const taps = q < Math.min(w, h) ? areaTaps : linearTaps;
  const xTaps = taps(w, width), yTaps = taps(h, height);
  const rows = new Float64Array(h * width * 3); // horizontal pass
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < width; x++) {
      for (const [s, k] of xTaps[x]) {
        for (let c = 0; c < 3; c++) rows[(y * width + x) * 3 + c] += k * data[(y * w + s) * 3 + c];
      }
    }
  }
  const out = new Uint8Array(width * height * 3); // vertical pass, rounded to 8 bits like OpenCV
  const roundHalfEven = (v) => (v - Math.floor(v) === 0.5 ? 2 * Math.round(v / 2) : Math.round(v));
  for (let y = 0; y < height; y++) {
    for (let i = 0; i < width * 3; i++) {
      let v = 0;
      for (const [s, k] of yTaps[y]) v += k * rows[s * width * 3 + i];
      out[y * width * 3 + i] = Math.min(255, Math.max(0, roundHalfEven(v)));
    }
  }
  return { data: out, width, height };
}

// Network input: float32 N x 3 x H x W, RGB, 0..255 (the graph normalises); with flip, N = 2
// and the second image is the mirror image.
function toTensor(image, flip) {
  const { data, width: w, height: h } = image;
  const n = flip ? 2 : 1, plane = h * w, out = new Float32Array(n * 3 * plane);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      for (let c = 0; c < 3; c++) {
        const v = data[(y * w + x) * 3 + c];
        out[c * plane + y * w + x] = v;
        if (flip) out[(3 + c) * plane + y * w + (w - 1 - x)] = v;
      }
    }
  }
  return new ort.Tensor('float32', out, [n, 3, h, w]);
}

// ---- dense evaluation ----------------------------------------------------------------------

// 'probs' = softmax(spatial mean of the score map); mean over {image, mirror}, then over scales.
async function classify(session, image, scales, flip, numClasses) {
  const total = new Float64Array(numClasses);
  for (const q of scales) {
    const { probs } = await session.run({ image: toTensor(rescale(image, q), flip) }, ['probs']);
    if (probs.dims[1] !== numClasses) throw new Error(`the graph gives ${probs.dims[1]} classes, its metadata lists ${numClasses}`);
    const n = probs.dims[0];
    for (let i = 0; i < probs.data.length; i++) total[i % numClasses] += probs.data[i] / (n * scales.length);
  }
  return total;
}

function topK(probs, classes) {
  const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a] || a - b);
  return order.slice(0, TOP_K).map((i) => ({
    index: classes[i].index, synset: classes[i].synset || '', name: classes[i].name, prob: probs[i],
  }));
}

// Hidden test hook: run the graph on a raw float32 tensor and print both outputs.
async function runRaw(session, file, shape) {
  if (shape.length !== 4) throw new UsageError('--shape must be N,C,H,W');
  const bytes = fs.readFileSync(file);
  const count = shape.reduce((a, b) => a * b, 1);
  if (bytes.length !== count * 4) throw new Error(`${file}: size does not match --shape`);
  const data = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
  const outputs = await session.run({ image: new ort.Tensor('float32', data, shape) }, ['scores', 'probs']);
  const result = {};
  for (const name of ['scores', 'probs']) result[name] = { shape: outputs[name].dims, data: Array.from(outputs[name].data) };
  process.stdout.write(JSON.stringify(result) + '\n');
  return 0;
}

function parseInts(text, option) {
  const values = text.split(',').filter((s) => s.trim()).map(Number);
  if (!values.length || values.some((v) => !Number.isInteger(v) || v <= 0)) {
    throw new UsageError(`${option} '${text}' must be comma-separated positive integers`);
  }
  return values;
}

async function main(argv) {
  const positional = [];
  let scales = null, shape = null, rawInput = null, flip = true;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '--scales') scales = parseInts(value(), arg);
    else if (arg === '--no-flip') flip = false;
    else if (arg === '--raw-input') rawInput = value();
    else if (arg === '--shape') shape = parseInts(value(), arg);
    else if (arg === '-h' || arg === '--help') { console.log(USAGE); return 0; }
    else if (arg.startsWith('--')) throw new UsageError(`unknown option ${arg}`);
    else positional.push(arg);
  }
  if (!positional.length || (!rawInput && positional.length < 2)) throw new UsageError('a model and at least one image are required');

  const [modelPath, ...imagePaths] = positional;
  const { session, info } = await loadModel(modelPath);
  scales = scales || info.testScales;
  const small = scales.find((q) => q < info.cropSize);
  if (small !== undefined) throw new UsageError(`scale ${small} is smaller than the model's crop size ${info.cropSize}`);
  if (rawInput) return runRaw(session, rawInput, shape || []);

  const records = [];
  let failed = 0;
  for (const path of imagePaths) {
    const start = process.hrtime.bigint();
    try { // one bad image does not stop the batch
      const probs = await classify(session, await loadRgb(path), scales, flip, info.classes.length);
      const seconds = Math.round(Number(process.hrtime.bigint() - start) / 1e5) / 1e4;
      records.push({ path, top_k: topK(probs, info.classes), method: 'dense', scales, models: [modelPath], seconds });
    } catch (e) {
      const reason = `${path}: ${e.message.split('\n')[0]}`;
      console.error(`classify: error: ${reason}`);
      records.push({ path, error: reason });
      failed++;
    }
  }
  process.stdout.write(JSON.stringify(records, null, 2) + '\n');
  return failed ? 1 : 0;
}

module.exports = { loadModel, loadRgb, rescale, toTensor, classify, topK };

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (e) => {
    console.error(`classify: error: ${e.message.split('\n')[0]}`);
    if (e instanceof UsageError) console.error(USAGE);
    process.exitCode = e instanceof UsageError ? 2 : 1;
  });
}
