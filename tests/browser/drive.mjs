// Drives Debian's Chromium (headless, through playwright-core: no browser is downloaded) for
// the browser tests, one command at a time: the test writes one JSON command per line on stdin
// and reads one JSON answer per line on stdout, so that it can act between the browser's steps
// (post a location, stop the broker) and assert on what the page shows.
//
//   node drive.mjs            (Chromium: $UDATEST_CHROMIUM, else /usr/bin/chromium)
//
// Commands ({"op": …}); every answer is {"ok": true, "value": …} or {"ok": false, "error": …}:
//   open {width, height}           a new page with that viewport (closing the previous one)
//   viewport {width, height}       resize the page
//   goto {url}                     load a URL
//   wait {js, timeout_ms}          wait until the expression is truthy; value: its value and
//                                  `elapsed_ms`, the time it took
//   eval {js}                      the expression's value (JSON)
//   fill {selector, value}         type into an input
//   press {selector, key}          press a key in an element
//   click {selector}               click an element
//   screenshot {path, full_page}   write a PNG
//   problems                       console errors, page errors and failed requests so far
//   requests                       every request the page made so far, as "METHOD URL"
//   close                          end the browser and this process
// Exit code 1 when the browser cannot start.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const executablePath = process.env.UDATEST_CHROMIUM || "/usr/bin/chromium";
let browser;
try {
  browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox"] });
} catch (e) {
  console.error(`cannot start Chromium at ${executablePath}: ${e.message}`);
  process.exit(1);
}

let page = null;
let problems = [];
let requests = [];

async function open({ width = 1280, height = 800 }) {
  if (page) await page.context().close();
  const context = await browser.newContext({ viewport: { width, height } });
  page = await context.newPage();
  problems = [];
  requests = [];
  page.on("request", (r) => requests.push(`${r.method()} ${r.url()}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => {
    // An SSE stream cut when the page moves on is not a problem of the page.
    const why = r.failure()?.errorText ?? "";
    if (why !== "net::ERR_ABORTED") problems.push(`request failed: ${r.method()} ${r.url()} (${why})`);
  });
  return null;
}

function need() {
  if (!page) throw new Error("no page: send `open` first");
  return page;
}

const ops = {
  open,
  viewport: async ({ width, height }) => need().setViewportSize({ width, height }).then(() => null),
  goto: async ({ url }) => {
    await need().goto(url);
    return null;
  },
  wait: async ({ js, timeout_ms = 5000 }) => {
    const started = Date.now();
    const handle = await need().waitForFunction(js, null, { timeout: timeout_ms, polling: 100 });
    const value = await handle.jsonValue();
    return { value, elapsed_ms: Date.now() - started };
  },
  eval: async ({ js }) => need().evaluate(js),
  fill: async ({ selector, value }) => need().fill(selector, value).then(() => null),
  press: async ({ selector, key }) => need().press(selector, key).then(() => null),
  click: async ({ selector }) => need().click(selector).then(() => null),
  screenshot: async ({ path, full_page = false }) =>
    need().screenshot({ path, fullPage: full_page }).then(() => null),
  problems: async () => problems,
  requests: async () => requests,
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  let command;
  try {
    command = JSON.parse(line);
    if (command.op === "close") break;
    const op = ops[command.op];
    if (!op) throw new Error(`unknown op ${JSON.stringify(command.op)}`);
    answer = { ok: true, value: (await op(command)) ?? null };
  } catch (e) {
    answer = { ok: false, error: e.message.split("\n")[0] };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
await browser.close();
// stdin may stay open after `close`: end now rather than when the caller hangs up.
process.exit(0);
