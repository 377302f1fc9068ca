import { defineConfig } from '@playwright/test';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

// End-to-end tests for taskwire.
//
// Build first, from the repository root:  cargo leptos build --release
// Then run:                                cd end2end && npx playwright test
// (or `cargo leptos end-to-end --release`, which runs `npx playwright test` here).
//
// Browsers cannot be downloaded on this network, so the tests drive Debian's
// Chromium (apt-get install -y chromium); override with CHROMIUM_PATH.
// The server listens on 127.0.0.1:3100 unless TASKWIRE_E2E_PORT says otherwise.
// TASKWIRE_BIN runs another binary than ./target/release/taskwire (relative
// to the repository root), e.g. one built with CARGO_TARGET_DIR elsewhere;
// the server itself reads TASKWIRE_SITE_ROOT (default target/site) for the
// site's files. Both reach the servers the tests start, too (helpers.ts).

const PORT = process.env.TASKWIRE_E2E_PORT ?? '3100';
// The durable default, in a directory of this run's own.
// (The config is loaded by every worker too: each removes its own on exit.)
const DATA_DIR = mkdtempSync(path.join(tmpdir(), 'taskwire-e2e-'));
process.once('exit', () => rmSync(DATA_DIR, { recursive: true, force: true }));
const BASE_URL = `http://127.0.0.1:${PORT}`;
const BIN = process.env.TASKWIRE_BIN ?? './target/release/taskwire';

export default defineConfig({
  testDir: './tests',
  outputDir: 'test-results',
  // 'list' only: the html reporter keeps a server running after a failure.
  reporter: 'list',
  workers: 1,
  fullyParallel: false,
  retries: 0,
  timeout: 60_000,
  expect: { timeout: 10_000 },
  forbidOnly: !!process.env.CI,

  use: {
    baseURL: BASE_URL,
    trace: 'retain-on-failure',
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium',
      // Without the background-networking flags Chromium floods this closed
      // network with refused connections.
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    },
  },

  projects: [{ name: 'chromium' }],

  webServer: {
    // Run from the repository root: the release binary finds target/site there.
    command: `${BIN} --listen 127.0.0.1:${PORT} --admin-listen 127.0.0.1:0 --poll-interval-ms 200 --data-dir ${DATA_DIR}`,
    cwd: '..',
    url: `${BASE_URL}/`,
    reuseExistingServer: false,
    timeout: 60_000,
    stdout: 'pipe',
    stderr: 'pipe',
    gracefulShutdown: { signal: 'SIGTERM', timeout: 5_000 },
  },
});
