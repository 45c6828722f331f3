#!/usr/bin/env node
// drive: open the browser host's page in headless Chromium (the system's, driven by
// playwright-core), classify images through its file input as a user would, and print what the
// page shows as JSON on stdout. Used by tests/test_web.py, for the figures in docs/web.md and for
// the screenshot in docs/img/.
//
//   node drive.mjs URL IMAGE... [--chromium /usr/bin/chromium] [--screenshot FILE.png] [--timeout SECONDS]
//
// Output: { load_seconds, threads, isolated, peak_process_rss_bytes, records: [...] }, a record
// per image in the schema of `vgg-onnx infer --format json` ({ path, top_k, ... } or
// { path, error }, the error as the page shows it). Exit status 0, 1 when some image failed or
// the model did not load, 2 on a usage error.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const USAGE = 'usage: drive.mjs URL IMAGE... [--chromium /usr/bin/chromium] [--screenshot FILE.png] [--timeout SECONDS]';

function parseOptions(argv) {
  const options = { positional: [], chromium: '/usr/bin/chromium', screenshot: null, timeout: 600 };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (['--chromium', '--screenshot', '--timeout'].includes(arg)) {
      if (i + 1 >= argv.length) throw Object.assign(new Error(`${arg} needs a value`), { usage: true });
      options[arg.slice(2)] = argv[++i];
    } else if (arg.startsWith('--')) throw Object.assign(new Error(`unknown option ${arg}`), { usage: true });
    else options.positional.push(arg);
  }
  options.timeout = Number(options.timeout) * 1000;
  if (!(options.timeout > 0) || options.positional.length < 1) throw Object.assign(new Error('a URL is required'), { usage: true });
  return options;
}

// The largest peak resident set (VmHWM) among the browser's processes: the renderer's, which
// holds the WebAssembly memory. Linux only; null elsewhere.
function peakProcessRss(profileDir) {
  let pids;
  try {
    pids = fs.readdirSync('/proc').filter((name) => /^\d+$/.test(name));
  } catch {
    return null;
  }
  const parent = new Map(), roots = new Set();
  for (const pid of pids) {
    try {
      parent.set(pid, fs.readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /s, '').split(' ')[1]);
      if (fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(profileDir)) roots.add(pid);
    } catch { /* the process ended meanwhile */ }
  }
  const inTree = (pid) => { for (let p = pid; p && p !== '0' && p !== '1'; p = parent.get(p)) if (roots.has(p)) return true; return false; };
  let peak = 0;
  for (const pid of pids.filter(inTree)) {
    try {
      const match = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmHWM:\s+(\d+) kB/);
      if (match) peak = Math.max(peak, Number(match[1]) * 1024);
    } catch { /* ended meanwhile */ }
  }
  return peak || null;
}

// Pick one image in the page and wait for it to finish: its record, or { path, error }.
async function classifyOne(page, image, timeout) {
  const runs = await page.evaluate(() => Number(document.body.dataset.runs));
  await page.setInputFiles('#file', image);
  await page.waitForFunction((n) => Number(document.body.dataset.runs) > n, runs, { timeout });
  const { state, record, error } = await page.evaluate(() => ({
    state: document.body.dataset.state, record: document.getElementById('result').dataset.record,
    error: document.getElementById('error').textContent,
  }));
  return state === 'done' ? { ...JSON.parse(record), path: image } : { path: image, error };
}

async function screenshot(page, file) { // written beside its name, then renamed over it
  const temp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp.png`);
  await page.screenshot({ path: temp, fullPage: true });
  fs.renameSync(temp, file);
}

async function drive(options) {
  const [url, ...images] = options.positional;
  const profileDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vgg-onnx-chromium-'));
  const args = process.getuid && process.getuid() === 0 ? ['--no-sandbox'] : []; // Chromium's sandbox refuses root
  const context = await chromium.launchPersistentContext(profileDir, { executablePath: options.chromium, headless: true, args, viewport: { width: 1100, height: 800 } });
  try {
    const page = context.pages()[0] || await context.newPage();
    page.on('pageerror', (e) => console.error(`drive: page error: ${e.message}`));
    page.on('console', (m) => { if (m.type() === 'error') console.error(`drive: page console: ${m.text()}`); });
    await page.goto(url);
    await page.waitForFunction(() => ['ready', 'failed'].includes(document.body.dataset.state), null, { timeout: options.timeout });
    const loaded = await page.evaluate(() => ({ state: document.body.dataset.state, error: document.getElementById('error').textContent,
      load_seconds: Number(document.body.dataset.loadSeconds), threads: Number(document.body.dataset.threads), isolated: self.crossOriginIsolated }));
    if (loaded.state !== 'ready') return { result: { error: loaded.error }, failed: true };
    const records = [];
    for (const image of images) records.push(await classifyOne(page, image, options.timeout));
    if (options.screenshot) await screenshot(page, options.screenshot);
    const { state, error, ...figures } = loaded;
    const result = { ...figures, peak_process_rss_bytes: peakProcessRss(profileDir), records };
    return { result, failed: records.some((r) => r.error) };
  } finally {
    await context.close();
    fs.rmSync(profileDir, { recursive: true, force: true });
  }
}

try {
  const { result, failed } = await drive(parseOptions(process.argv.slice(2)));
  process.stdout.write(JSON.stringify(result, null, 2) + '\n');
  process.exitCode = failed ? 1 : 0;
} catch (e) {
  console.error(`drive: error: ${String(e.message || e).split('\n')[0]}`);
  if (e.usage) console.error(USAGE);
  process.exitCode = e.usage ? 2 : 1;
}
