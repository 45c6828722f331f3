#!/usr/bin/env node
// classify: multi-scale dense evaluation of a vgg-onnx model from Node.js (docs/protocol.md §3, §5).
//
//   node classify.js MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip] [--max-pixels 100000000]
//
// Prints a JSON array in the schema of `vgg-onnx infer --format json`. sharp decodes the image
// and onnxruntime-node runs the .onnx file; the rest (the metadata reader and its checks, the
// header checks of docs/decoding.md, OpenCV's rescale arithmetic, mirror and tensor layout) is
// runtime/js/vgg-core.js, the one implementation the browser page (runtime/web) uses too. The
// model's metadata (classes, test scales) is read from the file's metadata_props, or from the
// JSON file export writes beside it, and validated once at load. Any number of image paths
// works (a long command line is passed on to a copy of this script over a pipe:
// onnxruntime-node crashes on one). As a module it gives the steps: loadModel, loadRgb,
// rescale, toTensor, classify, topK (and imageSizeFromHeader, the header check).
'use strict';

const fs = require('fs');
const ort = require('onnxruntime-node');
const sharp = require('sharp');
const core = require('../js/vgg-core.js');

const { MAX_IMAGE_BYTES, MAX_MODEL_BYTES, DEFAULT_MAX_PIXELS, rescale, topK, imageSizeFromHeader } = core;

const USAGE = 'usage: classify.js MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip] [--max-pixels 100000000]';

class UsageError extends Error {}

// ---- files ----------------------------------------------------------------------------------

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

// The graph and its metadata: { session, info: { config, classes, testScales, cropSize } }.
async function loadModel(modelPath) {
  let onnxBytes;
  try {
    onnxBytes = readRegularFile(modelPath, MAX_MODEL_BYTES);
  } catch (e) {
    throw new Error(`${modelPath}: ${e.message}`);
  }
  const props = core.readMetadataProps(onnxBytes);
  const info = core.modelInfo(modelPath, props, core.hasMetadata(props) ? null : readSidecar(modelPath));
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
  core.checkClassCount(modelPath, width, info);
  return { session, info };
}

// ---- preprocessing (docs/protocol.md §5, docs/decoding.md) -----------------------------------

// 8-bit RGB: EXIF orientation applied, alpha dropped, grayscale (and CMYK) to three channels,
// 16-bit samples scaled to 8 bits as round(v*255/65535); an embedded ICC profile is kept, not
// applied, as OpenCV does. Sizes are checked against maxPixels from the header (for the image
// and each of the scales it will be rescaled to) before decoding.
async function loadRgb(path, { maxPixels = DEFAULT_MAX_PIXELS, scales = [] } = {}) {
  const bytes = readRegularFile(path, MAX_IMAGE_BYTES);
  core.checkImageBytes(bytes, { maxPixels, scales });
  try {
    const options = { limitInputPixels: maxPixels }; // sharp's own check, a second line of defence
    const sixteenBit = (await sharp(bytes, options).metadata()).depth === 'ushort';
    let { data, info } = await sharp(bytes, options).rotate().keepIccProfile().removeAlpha()
      .toColourspace(sixteenBit ? 'rgb16' : 'srgb').raw({ depth: sixteenBit ? 'ushort' : 'uchar' })
      .toBuffer({ resolveWithObject: true });
    if (sixteenBit) {
      data = core.to8Bit(new Uint16Array(data.buffer, data.byteOffset, data.length / 2));
    }
    return { data, width: info.width, height: info.height };
  } catch (e) {
    throw new Error(`cannot decode image (${e.message.split('\n')[0]})`);
  }
}

// ---- dense evaluation ----------------------------------------------------------------------

// Network input in vgg-core's layout (N x 3 x H x W, the mirror image second) as an ort.Tensor.
const asTensor = ({ data, dims }) => new ort.Tensor('float32', data, dims);
const toTensor = (image, flip) => asTensor(core.toTensorData(image, flip));

// Posteriors over the classes: vgg-core's averaging over the views and the scales.
async function classify(session, image, scales, flip, numClasses) {
  const runViews = async (input) => (await session.run({ image: asTensor(input) }, ['probs'])).probs;
  return core.denseEvaluate(runViews, image, { scales, flip, numClasses });
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
