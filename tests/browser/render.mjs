// Opens a page in Debian's Chromium (headless, through playwright-core: no browser is
// downloaded), waits until the page's `#status` element no longer says `loading`, and prints,
// as one JSON line, what it rendered: that status, the text of each cell of each row matching a
// CSS selector, and the page's console errors and failed requests (so a test can say why a
// page stayed empty).
//
//   node render.mjs <url> <row selector> [timeout ms]
//
// Chromium: $UDATEST_CHROMIUM, else /usr/bin/chromium. Exit code 0 (with the status still
// `loading` when the page did not finish in time: the caller decides), 2 on a usage error, 1
// when the browser cannot start.
import { chromium } from "playwright-core";

const [url, selector, timeoutArg] = process.argv.slice(2);
if (!url || !selector) {
  console.error("usage: node render.mjs <url> <row selector> [timeout ms]");
  process.exit(2);
}
const timeout = Number(timeoutArg ?? 10000);
const executablePath = process.env.UDATEST_CHROMIUM || "/usr/bin/chromium";

let browser;
try {
  browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox"] });
} catch (e) {
  console.error(`cannot start Chromium at ${executablePath}: ${e.message}`);
  process.exit(1);
}
const problems = [];
try {
  const page = await browser.newPage();
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) =>
    problems.push(`request failed: ${r.method()} ${r.url()} (${r.failure()?.errorText})`),
  );
  await page.goto(url);
  try {
    await page.waitForFunction(
      () => (document.querySelector("#status")?.textContent ?? "loading") !== "loading",
      null,
      { timeout },
    );
  } catch (e) {
    problems.push(`still loading after ${timeout} ms`);
  }
  const rows = await page.$$eval(selector, (found) =>
    found.map((row) => Array.from(row.children).map((cell) => cell.textContent.trim())),
  );
  const status = await page.evaluate(() => document.querySelector("#status")?.textContent ?? "");
  console.log(JSON.stringify({ rows, status, problems }));
} finally {
  await browser.close();
}
