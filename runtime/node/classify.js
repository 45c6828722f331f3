#!/usr/bin/env node
// classify: multi-scale dense evaluation of a vgg-onnx model from Node.js (docs/protocol.md §3, §5).
//
//   node classify.js MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip] [--max-pixels 100000000]
//
// Prints a JSON array in the schema of `vgg-onnx infer --format json`. sharp decodes the image,
// the rescale is OpenCV's (INTER_AREA shrinking, INTER_LINEAR enlarging) written out below so
// that every host computes the same pixels, and onnxruntime-node runs the .onnx file. The
// model's metadata (classes, test scales) is read from the file's metadata_props, or from the
// JSON file export writes beside it, and validated once at load. Images are decoded by the rules
// of docs/decoding.md, as `vgg-onnx infer` does; any number of image paths works (a long command
// line is passed on to a copy of this script over a pipe: onnxruntime-node crashes on one).
// As a module it gives the steps: loadModel, loadRgb, rescale, toTensor, classify, topK (and
// imageSizeFromHeader, the header check of docs/decoding.md).
'use strict';

const fs = require('fs');
const ort = require('onnxruntime-node');
const sharp = require('sharp');

const USAGE = 'usage: classify.js MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip] [--max-pixels 100000000]';
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
  const props = Object.create(null); // a key named __proto__ is a key like any other
  for (const [field, , entry] of fields(onnxBytes)) {
    if (field !== 14 || !entry) continue;
    const kv = ['', ''];
    for (const [f, , text] of fields(entry)) if ((f === 1 || f === 2) && text) kv[f - 1] = text.toString('utf8');
    // values are strings, structured ones JSON: decode them into the shape of the JSON sidecar
    try { props[kv[0]] = JSON.parse(kv[1]); } catch { props[kv[0]] = kv[1]; }
  }
  return props;
}

// ---- files ----------------------------------------------------------------------------------

const MAX_IMAGE_BYTES = 2 ** 30; // docs/decoding.md: no image file is larger
const MAX_MODEL_BYTES = 2 ** 31; // protobuf's own limit for one .onnx file

// Regular files only, opened without blocking (a FIFO would wait for a writer forever), read
// up to the size they had when opened and at most maxBytes.
function readRegularFile(path, maxBytes) {
  let fd;
  try {
    fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  } catch (e) {
    // 'ENOENT: no such file or directory, open <path>': the caller names the path once
    throw new Error(`cannot read: ${e.code === 'ENOENT' ? 'No such file or directory' : e.message.replace(/, \w+ '.*'$/s, '')}`);
  }
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) throw new Error('cannot read: not a regular file');
    if (stat.size > maxBytes) throw new Error(`file of ${stat.size} bytes exceeds the size limit of ${maxBytes} bytes`);
    const bytes = Buffer.allocUnsafe(stat.size);
    let done = 0;
    for (let got = 1; done < bytes.length && got > 0; done += got) got = fs.readSync(fd, bytes, done, bytes.length - done, done);
    return bytes.subarray(0, done);
  } finally {
    fs.closeSync(fd);
  }
}

// ---- the model's metadata, validated once at load -------------------------------------------

function readSidecar(modelPath) { // vgg_D.onnx -> vgg_D.json, written by export
  const sidecar = modelPath.endsWith('.onnx') ? modelPath.slice(0, -5) + '.json' : modelPath + '.json';
  try {
    return JSON.parse(readRegularFile(sidecar, MAX_IMAGE_BYTES).toString('utf8'));
  } catch {
    return {}; // no sidecar: the caller reports the missing metadata
  }
}

function brief(value) { // a value quoted in a message, cut to one short line
  let text;
  try {
    text = JSON.stringify(value);
  } catch { // nested too deep to print
    text = Array.isArray(value) ? '[...]' : '{...}';
  }
  return String(text).length > 60 ? `${String(text).slice(0, 57)}...` : String(text);
}

const isInt = (value, low) => Number.isInteger(value) && value >= low && value <= 2 ** 31 - 1;

// docs/decoding.md, "The model": crop a positive multiple of 32, test scales a non-empty list of
// integers of at least the crop, classes a non-empty list of { index, name }.
function validateMetadata(meta) {
  const { classes, test_scales: testScales, crop_size: cropSize } = meta;
  if (!isInt(cropSize, 1) || cropSize % 32) throw new Error(`crop_size ${brief(cropSize)} is not a positive multiple of 32`);
  if (!Array.isArray(testScales) || !testScales.length) throw new Error(`test_scales ${brief(testScales)} is not a non-empty list`);
  const bad = testScales.find((q) => !isInt(q, cropSize));
  if (bad !== undefined) throw new Error(`test scale ${brief(bad)} is not an integer of at least the crop size ${cropSize}`);
  if (!Array.isArray(classes) || !classes.length) throw new Error('classes is not a non-empty list');
  const badClass = classes.find((c) => !c || !isInt(c.index, 0) || typeof c.name !== 'string');
  if (badClass !== undefined) throw new Error(`class entry ${brief(badClass)} lacks an integer index or a name`);
  return { classes, testScales, cropSize };
}

function readModelInfo(modelPath, onnxBytes) {
  let meta = readMetadataProps(onnxBytes);
  if (!Object.keys(meta).length) meta = readSidecar(modelPath);
  if (!meta || String(meta.vgg_onnx_format) !== '1') {
    throw new Error(`${modelPath}: no vgg-onnx metadata (not exported by vgg-onnx export)`);
  }
  try {
    return validateMetadata(meta);
  } catch (e) {
    throw new Error(`${modelPath}: malformed vgg-onnx metadata (${e.message})`);
  }
}

// onnxruntime-node 1.30 segfaults in InferenceSession.create when the process's command line
// is longer than about 16,000 bytes (it reads /proc/self/cmdline): refuse instead of crashing.
const MAX_COMMAND_LINE = 16000;

function commandLineBytes() {
  try {
    return fs.readFileSync('/proc/self/cmdline').length;
  } catch { // not Linux: what Node knows of it
    return [process.execPath, ...process.execArgv, ...process.argv.slice(1)].reduce((n, a) => n + Buffer.byteLength(a) + 1, 0);
  }
}

// The graph and its metadata: { session, info: { classes, testScales, cropSize } }.
async function loadModel(modelPath) {
  let onnxBytes;
  try {
    onnxBytes = readRegularFile(modelPath, MAX_MODEL_BYTES);
  } catch (e) {
    throw new Error(`${modelPath}: ${e.message}`);
  }
  const info = readModelInfo(modelPath, onnxBytes);
  const length = commandLineBytes();
  if (length > MAX_COMMAND_LINE) {
    throw new Error(`this process's command line is ${length} bytes; onnxruntime-node crashes above about ${MAX_COMMAND_LINE}`);
  }
  let session;
  try {
    session = await ort.InferenceSession.create(onnxBytes);
  } catch (e) {
    throw new Error(`${modelPath}: ONNX Runtime cannot load the graph: ${e.message.split('\n')[0]}`);
  }
  const probs = session.outputMetadata.find((o) => o.name === 'probs');
  const width = probs && Array.isArray(probs.shape) ? probs.shape[1] : undefined;
  if (Number.isInteger(width) && width !== info.classes.length) {
    throw new Error(`${modelPath}: malformed vgg-onnx metadata (the graph gives ${width} classes, its metadata lists ${info.classes.length})`);
  }
  return { session, info };
}

// ---- the image header (docs/decoding.md) -----------------------------------------------------

class ImageError extends Error {}

const DEFAULT_MAX_PIXELS = 100000000; // as vgg-onnx infer --max-pixels

// Bounds-checked reads: a header shorter than its format's is corrupt.
function headerReader(bytes) {
  const need = (pos, size) => {
    if (!(pos + size <= bytes.length)) throw new ImageError('truncated or corrupt image header');
  };
  return {
    u: (pos, size, bigEndian) => {
      need(pos, size);
      return bigEndian ? bytes.readUIntBE(pos, size) : bytes.readUIntLE(pos, size);
    },
    i32le: (pos) => { need(pos, 4); return bytes.readInt32LE(pos); },
    starts: (pos, text) => bytes.subarray(pos, pos + text.length).equals(Buffer.from(text, 'latin1')),
  };
}

const FRAME_MARKERS = new Set([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF]);

function jpegSize(bytes, r) {
  let pos = 2;
  while (pos + 4 <= bytes.length) {
    if (bytes[pos] !== 0xFF) throw new ImageError('corrupt JPEG (bad marker)');
    const marker = bytes[pos + 1];
    if (marker === 0xFF) { pos += 1; continue; } // fill byte
    if (marker === 0x01 || marker === 0xD8 || (marker >= 0xD0 && marker <= 0xD7)) { pos += 2; continue; }
    const length = r.u(pos + 2, 2, true);
    if (FRAME_MARKERS.has(marker)) {
      if (pos + 9 > bytes.length) break;
      const [height, width] = [r.u(pos + 5, 2, true), r.u(pos + 7, 2, true)];
      // a truncated file has no end-of-image marker after its scans
      if (bytes.indexOf(Buffer.from([0xFF, 0xD9]), pos) < 0) throw new ImageError('truncated JPEG (no end-of-image marker)');
      return [width, height];
    }
    if (marker === 0xDA || marker === 0xD9) break;
    pos += 2 + length;
  }
  throw new ImageError('truncated or corrupt JPEG (no frame header)');
}

// The first ImageWidth/ImageLength entry counts, as in libtiff (a duplicated tag is ignored).
function tiffSize(bytes, r) {
  const big = bytes[0] === 0x4D;
  try {
    const ifd = r.u(4, 4, big), count = r.u(ifd, 2, big), found = {};
    for (let i = 0; i < count; i++) {
      const entry = ifd + 2 + 12 * i, tag = r.u(entry, 2, big), type = r.u(entry + 2, 2, big);
      if ((tag === 256 || tag === 257) && !(tag in found)) found[tag] = r.u(entry + 8, type === 3 ? 2 : 4, big);
    }
    if (256 in found && 257 in found) return [found[256], found[257]];
  } catch (e) {
    if (!(e instanceof ImageError)) throw e;
  }
  throw new ImageError('truncated or corrupt TIFF header');
}

function pnmSize(bytes) {
  const text = bytes.subarray(2, 4096).toString('latin1').replace(/#[^\n]*(\n|$)/g, ' ');
  const tokens = text.trim().split(/\s+/).slice(0, 2);
  if (tokens.length < 2 || !tokens.every((t) => /^\d{1,12}$/.test(t))) throw new ImageError('corrupt PNM header');
  return tokens.map(Number);
}

function webpSize(bytes, r) {
  if (r.starts(12, 'VP8 ')) return [r.u(26, 2, false) & 0x3FFF, r.u(28, 2, false) & 0x3FFF];
  if (r.starts(12, 'VP8L')) {
    const [b0, b1, b2, b3] = [21, 22, 23, 24].map((i) => r.u(i, 1, false));
    return [1 + (((b1 & 0x3F) << 8) | b0), 1 + (((b3 & 0xF) << 10) | (b2 << 2) | (b1 >> 6))];
  }
  if (r.starts(12, 'VP8X')) return [1 + r.u(24, 3, false), 1 + r.u(27, 3, false)];
  throw new ImageError('corrupt WebP header');
}

// [width, height] from the header alone, so that huge images are refused undecoded.
function imageSizeFromHeader(bytes) {
  const r = headerReader(bytes);
  if (r.starts(0, '\xff\xd8')) return jpegSize(bytes, r);
  if (r.starts(0, '\x89PNG\r\n\x1a\n')) {
    if (!r.starts(12, 'IHDR')) throw new ImageError('corrupt PNG header');
    return [r.u(16, 4, true), r.u(20, 4, true)];
  }
  if (r.starts(0, 'GIF87a') || r.starts(0, 'GIF89a')) return [r.u(6, 2, false), r.u(8, 2, false)];
  if (r.starts(0, 'BM')) {
    if (r.u(14, 4, false) === 12) return [r.u(18, 2, false), r.u(20, 2, false)];
    return [Math.abs(r.i32le(18)), Math.abs(r.i32le(22))];
  }
  if (r.starts(0, 'RIFF') && r.starts(8, 'WEBP')) return webpSize(bytes, r);
  if (r.starts(0, 'II*\x00') || r.starts(0, 'MM\x00*')) return tiffSize(bytes, r);
  if (bytes[0] === 0x50 && bytes[1] >= 0x31 && bytes[1] <= 0x36) return pnmSize(bytes);
  throw new ImageError('not a supported image (JPEG, PNG, BMP, GIF, WebP, TIFF or PNM)');
}

// The limits of docs/decoding.md, checked before decoding, with vgg-onnx infer's messages.
function checkImageSize(bytes, maxPixels, scales) {
  const [width, height] = imageSizeFromHeader(bytes);
  if (width <= 0 || height <= 0) throw new ImageError(`invalid image size ${width}x${height}`);
  if (width * height > maxPixels) throw new ImageError(`${width}x${height} image exceeds the pixel limit of ${maxPixels} (--max-pixels)`);
  for (const q of scales) { // rotation by EXIF swaps width and height: the rescaled area stays
    const [w, h] = rescaledSize(width, height, q);
    if (w * h > maxPixels) throw new ImageError(`rescaled to ${w}x${h} it would exceed the pixel limit of ${maxPixels}`);
  }
  const png = headerReader(bytes).starts(0, '\x89PNG\r\n\x1a\n');
  if (png && bytes.indexOf('IEND', 0, 'latin1') < 0) throw new ImageError('truncated PNG (no IEND chunk)');
}

// ---- preprocessing (docs/protocol.md §5, docs/decoding.md) -----------------------------------

// 8-bit RGB: EXIF orientation applied, alpha dropped, grayscale (and CMYK) to three channels,
// 16-bit samples scaled to 8 bits as round(v*255/65535); an embedded ICC profile is kept, not
// applied, as OpenCV does. Sizes are checked against maxPixels from the header (for the image
// and each of the scales it will be rescaled to) before decoding.
async function loadRgb(path, { maxPixels = DEFAULT_MAX_PIXELS, scales = [] } = {}) {
  const bytes = readRegularFile(path, MAX_IMAGE_BYTES);
  if (!bytes.length) throw new ImageError('empty file');
  checkImageSize(bytes, maxPixels, scales);
  try {
    const options = { limitInputPixels: maxPixels }; // sharp's own check, a second line of defence
    const sixteenBit = (await sharp(bytes, options).metadata()).depth === 'ushort';
    let { data, info } = await sharp(bytes, options).rotate().keepIccProfile().removeAlpha()
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
  let bytes;
  try {
    bytes = readRegularFile(file, MAX_IMAGE_BYTES);
  } catch (e) {
    throw new Error(`${file}: ${e.message}`);
  }
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

function parseOptions(argv) {
  const options = { positional: [], scales: null, shape: null, rawInput: null, flip: true, maxPixels: DEFAULT_MAX_PIXELS, help: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '--scales') options.scales = parseInts(value(), arg);
    else if (arg === '--no-flip') options.flip = false;
    else if (arg === '--max-pixels') {
      const text = value();
      options.maxPixels = Number(text);
      if (!/^\d+$/.test(text) || !(options.maxPixels > 0)) throw new UsageError(`--max-pixels ${text} must be positive`);
    } else if (arg === '--raw-input') options.rawInput = value();
    else if (arg === '--shape') options.shape = parseInts(value(), arg);
    else if (arg === '-h' || arg === '--help') options.help = true;
    else if (arg.startsWith('--')) throw new UsageError(`unknown option ${arg}`);
    else options.positional.push(arg);
  }
  return options;
}

// One record per image, in order; a bad image is an error record and the batch goes on.
async function classifyImages(session, info, modelPath, imagePaths, { scales, flip, maxPixels }) {
  const records = [];
  let failed = 0;
  for (const path of imagePaths) {
    const start = process.hrtime.bigint();
    try {
      const image = await loadRgb(path, { maxPixels, scales });
      const probs = await classify(session, image, scales, flip, info.classes.length);
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

async function main(argv) {
  const options = parseOptions(argv);
  if (options.help) { console.log(USAGE); return 0; }
  const { positional, rawInput } = options;
  if (!positional.length || (!rawInput && positional.length < 2)) throw new UsageError('a model and at least one image are required');

  const [modelPath, ...imagePaths] = positional;
  const { session, info } = await loadModel(modelPath);
  const scales = options.scales || info.testScales;
  const small = scales.find((q) => q < info.cropSize);
  if (small !== undefined) throw new UsageError(`scale ${small} is smaller than the model's crop size ${info.cropSize}`);
  if (rawInput) return runRaw(session, rawInput, options.shape || []);
  return classifyImages(session, info, modelPath, imagePaths, { ...options, scales });
}

// A command line longer than this is handed to a copy of this script over a pipe, so that the
// process that creates the session has a short one (see MAX_COMMAND_LINE).
const REEXEC_ABOVE = 8192;
const ARGS_FROM_STDIN = '--args-from-stdin'; // internal: the arguments, as a JSON array, on stdin

function runWithShortCommandLine(argv) {
  const { spawn } = require('child_process');
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...process.execArgv, __filename, ARGS_FROM_STDIN], { stdio: ['pipe', 'inherit', 'inherit'] });
    // Ctrl-C or a kill of this process ends the copy too, and then this process by the same signal
    const stops = ['SIGINT', 'SIGTERM', 'SIGHUP'], forward = (name) => child.kill(name);
    for (const name of stops) process.on(name, forward);
    child.on('error', (e) => { console.error(`classify: error: cannot start node: ${e.message}`); resolve(1); });
    child.on('exit', (code, signal) => {
      for (const name of stops) process.off(name, forward);
      if (stops.includes(signal)) process.kill(process.pid, signal);
      else if (signal) console.error(`classify: error: the classifying process ended by ${signal}`);
      resolve(signal ? 1 : code);
    });
    child.stdin.on('error', () => {}); // a child that exits early is reported by 'exit'
    child.stdin.end(JSON.stringify(argv));
  });
}

function commandLineArguments() {
  const argv = process.argv.slice(2);
  if (argv.length === 1 && argv[0] === ARGS_FROM_STDIN) return JSON.parse(fs.readFileSync(0, 'utf8'));
  return argv;
}

module.exports = { loadModel, loadRgb, rescale, toTensor, classify, topK, imageSizeFromHeader, DEFAULT_MAX_PIXELS };

if (require.main === module) {
  const long = commandLineBytes() > REEXEC_ABOVE && process.argv[2] !== ARGS_FROM_STDIN;
  Promise.resolve().then(() => (long ? runWithShortCommandLine(process.argv.slice(2)) : main(commandLineArguments()))).then((code) => { process.exitCode = code; }, (e) => {
    console.error(`classify: error: ${e.message.split('\n')[0]}`);
    if (e instanceof UsageError) console.error(USAGE);
    process.exitCode = e instanceof UsageError ? 2 : 1;
  });
}
