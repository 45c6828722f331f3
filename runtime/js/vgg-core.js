// vgg-core: the parts of a vgg-onnx host that do not depend on the platform, shared by the
// Node.js host (runtime/node/classify.js, through require) and the browser page
// (runtime/web/, through a <script> tag, as the global `vggCore`): the model's metadata reader
// and its checks, the image header checks of docs/decoding.md, the rescale rule with OpenCV's
// INTER_AREA / INTER_LINEAR arithmetic (docs/protocol.md §5), the mirror and tensor layout, and
// the dense evaluation's averaging (docs/protocol.md §3). Bytes are Uint8Arrays (a Node Buffer
// is one); decoding a file to RGB and running the graph are the host's.
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.vggCore = factory();
}(typeof self !== 'undefined' ? self : this, function () {
  'use strict';

  const TOP_K = 5;
  const MAX_IMAGE_BYTES = 2 ** 30; // docs/decoding.md: no image file is larger
  const MAX_MODEL_BYTES = 2 ** 31; // protobuf's own limit for one .onnx file
  const DEFAULT_MAX_PIXELS = 100000000; // as vgg-onnx infer --max-pixels

  // ---- the model's metadata ----------------------------------------------------------------

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

  const utf8 = new TextDecoder('utf-8');

  // metadata_props as { key: value } strings; vgg-onnx writes one key, METADATA_KEY, whose value
  // is the model's metadata document as JSON (the same document as the JSON sidecar).
  const METADATA_KEY = 'vgg_onnx';
  const FORMAT_VERSION = 2;

  function readMetadataProps(onnxBytes) {
    const props = Object.create(null); // a key named __proto__ is a key like any other
    for (const [field, , entry] of fields(onnxBytes)) {
      if (field !== 14 || !entry) continue;
      const kv = ['', ''];
      for (const [f, , text] of fields(entry)) if ((f === 1 || f === 2) && text) kv[f - 1] = utf8.decode(text);
      props[kv[0]] = kv[1];
    }
    return props;
  }

  // Whether the file holds its own metadata document (else the host reads the JSON sidecar).
  const hasMetadata = (props) => METADATA_KEY in props;

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

  // { config, classes, testScales, cropSize } from the metadata document (the .onnx file's own,
  // parsed once here, or else its JSON sidecar's), with the one-line messages of docs/decoding.md
  // §5 naming the model.
  function modelInfo(modelName, props, sidecar) {
    let meta = sidecar;
    if (hasMetadata(props)) {
      try {
        meta = JSON.parse(props[METADATA_KEY]);
      } catch (e) { // not JSON, or nested too deep to parse
        throw new Error(`${modelName}: malformed vgg-onnx metadata (the '${METADATA_KEY}' value is not JSON)`);
      }
    } else if ('vgg_onnx_format' in props) { // version 1's layout: one key per field
      throw new Error(`${modelName}: metadata format 1 (an older vgg-onnx, one key a field): export it again with this version`);
    }
    const format = meta && typeof meta === 'object' ? meta.vgg_onnx_format : undefined;
    if (format === undefined || format === null) {
      throw new Error(`${modelName}: no vgg-onnx metadata (not exported by vgg-onnx export)`);
    }
    if (format !== FORMAT_VERSION) {
      throw new Error(`${modelName}: vgg-onnx metadata format ${brief(format)}, this host reads format ${FORMAT_VERSION}`);
    }
    try {
      return { config: typeof meta.config === 'string' ? meta.config : '', ...validateMetadata(meta) };
    } catch (e) {
      throw new Error(`${modelName}: malformed vgg-onnx metadata (${e.message})`);
    }
  }

  // The graph's 'probs' width (when static) must match the metadata's class count.
  function checkClassCount(modelName, width, info) {
    if (Number.isInteger(width) && width !== info.classes.length) {
      throw new Error(`${modelName}: malformed vgg-onnx metadata (the graph gives ${width} classes, its metadata lists ${info.classes.length})`);
    }
  }

  // ---- the image header (docs/decoding.md) ---------------------------------------------------

  class ImageError extends Error {}

  // Bounds-checked reads: a header shorter than its format's is corrupt.
  function headerReader(bytes) {
    const need = (pos, size) => {
      if (!(pos + size <= bytes.length)) throw new ImageError('truncated or corrupt image header');
    };
    return {
      u: (pos, size, bigEndian) => {
        need(pos, size);
        let value = 0;
        for (let i = 0; i < size; i++) value += bytes[pos + (bigEndian ? i : size - 1 - i)] * 2 ** (8 * (size - 1 - i));
        return value;
      },
      i32le: (pos) => { need(pos, 4); return bytes[pos] | (bytes[pos + 1] << 8) | (bytes[pos + 2] << 16) | (bytes[pos + 3] << 24); },
      starts: (pos, text) => text.length <= bytes.length - pos && Array.from(text).every((ch, i) => bytes[pos + i] === ch.charCodeAt(0)),
    };
  }

  // The first position at or after `from` where the latin1 string `text` occurs, or -1.
  function find(bytes, text, from = 0) {
    const first = text.charCodeAt(0), r = headerReader(bytes);
    for (let pos = bytes.indexOf(first, from); pos >= 0; pos = bytes.indexOf(first, pos + 1)) {
      if (r.starts(pos, text)) return pos;
    }
    return -1;
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
        if (find(bytes, '\xff\xd9', pos) < 0) throw new ImageError('truncated JPEG (no end-of-image marker)');
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
    const text = String.fromCharCode(...bytes.subarray(2, 4096)).replace(/#[^\n]*(\n|$)/g, ' ');
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

  const PNG_SIGNATURE = '\x89PNG\r\n\x1a\n';

  // [width, height] from the header alone, so that huge images are refused undecoded.
  function imageSizeFromHeader(bytes) {
    const r = headerReader(bytes);
    if (r.starts(0, '\xff\xd8')) return jpegSize(bytes, r);
    if (r.starts(0, PNG_SIGNATURE)) {
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

  // The checks of docs/decoding.md §1 (size) and §3, in its order, before decoding, with
  // vgg-onnx infer's messages; returns [width, height] from the header.
  function checkImageBytes(bytes, { maxPixels = DEFAULT_MAX_PIXELS, scales = [] } = {}) {
    if (bytes.length > MAX_IMAGE_BYTES) throw new ImageError(`file of ${bytes.length} bytes exceeds the size limit of ${MAX_IMAGE_BYTES} bytes`);
    if (!bytes.length) throw new ImageError('empty file');
    const [width, height] = imageSizeFromHeader(bytes);
    if (width <= 0 || height <= 0) throw new ImageError(`invalid image size ${width}x${height}`);
    if (width * height > maxPixels) throw new ImageError(`${width}x${height} image exceeds the pixel limit of ${maxPixels} (--max-pixels)`);
    for (const q of scales) { // rotation by EXIF swaps width and height: the rescaled area stays
      const [w, h] = rescaledSize(width, height, q);
      if (w * h > maxPixels) throw new ImageError(`rescaled to ${w}x${h} it would exceed the pixel limit of ${maxPixels}`);
    }
    if (headerReader(bytes).starts(0, PNG_SIGNATURE) && find(bytes, 'IEND') < 0) throw new ImageError('truncated PNG (no IEND chunk)');
    return [width, height];
  }

  // ---- decoded pixels to 8-bit RGB (docs/decoding.md §4) -------------------------------------

  // 16-bit samples become round(v * 255 / 65535).
  const to8Bit = (wide) => Uint8Array.from(wide, (v) => Math.floor((v * 255 + 32767) / 65535));

  // RGBA (a canvas's ImageData) to RGB: alpha dropped, not composited.
  function rgbaToRgb(rgba, width, height) {
    const data = new Uint8Array(width * height * 3);
    for (let p = 0, q = 0; q < data.length; p += 4, q += 3) {
      data[q] = rgba[p]; data[q + 1] = rgba[p + 1]; data[q + 2] = rgba[p + 2];
    }
    return { data, width, height };
  }

  // ---- preprocessing (docs/protocol.md §5) ---------------------------------------------------

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

  // image: { data: Uint8Array RGB, width, height } -> the same at scale q.
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
  // and the second image is the mirror image. Returns { data, dims } for the host's tensor type.
  function toTensorData(image, flip) {
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
    return { data: out, dims: [n, 3, h, w] };
  }

  // ---- dense evaluation ----------------------------------------------------------------------

  // 'probs' = softmax(spatial mean of the score map); mean over {image, mirror}, then over scales.
  // runViews({ data, dims }, q) runs the graph and resolves to its 'probs' ({ data, dims });
  // onScale(i, q), when given, is called before each scale (progress).
  async function denseEvaluate(runViews, image, { scales, flip, numClasses, onScale }) {
    const total = new Float64Array(numClasses);
    for (const [i, q] of scales.entries()) {
      if (onScale) await onScale(i, q);
      const probs = await runViews(toTensorData(rescale(image, q), flip), q);
      if (probs.dims[1] !== numClasses) throw new Error(`the graph gives ${probs.dims[1]} classes, its metadata lists ${numClasses}`);
      const n = probs.dims[0];
      for (let i = 0; i < probs.data.length; i++) total[i % numClasses] += probs.data[i] / (n * scales.length);
    }
    return total;
  }

  // The TOP_K most probable classes in the schema of `vgg-onnx infer --format json`.
  function topK(probs, classes) {
    const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a] || a - b);
    return order.slice(0, TOP_K).map((i) => ({
      index: classes[i].index, synset: classes[i].synset || '', name: classes[i].name, prob: probs[i],
    }));
  }

  return {
    TOP_K, MAX_IMAGE_BYTES, MAX_MODEL_BYTES, DEFAULT_MAX_PIXELS, ImageError,
    readMetadataProps, hasMetadata, validateMetadata, modelInfo, checkClassCount,
    imageSizeFromHeader, checkImageBytes, to8Bit, rgbaToRgb,
    rescaledSize, rescale, toTensorData, denseEvaluate, topK,
  };
}));
