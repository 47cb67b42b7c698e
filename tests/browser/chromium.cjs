// What the browser tests launch: puppeteer-core (installed by scripts/fetch-tokenizer.sh into
// .cache/browser) and Debian's Chromium (scripts/install-deps.sh; ARBITER_CHROMIUM overrides its
// path). Either one missing ends the process with 77, which ctest reports as a skip.
"use strict";
const fs = require("fs");

const SKIP = 77;

function browserTools() {
  let puppeteer;
  try {
    puppeteer = require("puppeteer-core");
  } catch (e) {
    console.log("SKIP: puppeteer-core is not installed (scripts/fetch-tokenizer.sh installs it into .cache/browser)");
    process.exit(SKIP);
  }
  const chromium = process.env.ARBITER_CHROMIUM || "/usr/bin/chromium";
  if (!fs.existsSync(chromium)) {
    console.log(`SKIP: no Chromium at ${chromium} (Debian package chromium, scripts/install-deps.sh)`);
    process.exit(SKIP);
  }
  return { puppeteer, chromium };
}

module.exports = { browserTools };
