import { test as base, expect, type Locator, type Page } from '@playwright/test';
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

// Shared helpers of the end-to-end tests.
//
// The page's DOM contract:
//   main[data-hydrated="true"]              once the wasm has hydrated
//   #conn[data-state]                       connecting | connected | reconnecting | offline
//   form#start-form                         the chosen kind's fields, from its schema
//                                           (label[for] > #field-<name>[name=<name>]:
//                                           input type=number|text|checkbox, or select),
//                                           button[type=submit], button#start-10;
//                                           simulate's: input[name=duration_ms|steps|fail_at]
//   select#kind                             only with several kinds: option value = index,
//                                           text = the kind's title
//   #start-error, #err-<field>              form and field errors (aria-invalid on the input)
//   #help-<field>                           a property's description (aria-describedby)
//   head script#tw-kinds                    the kinds offered (JSON), as GET /api/kinds
//   nav.toolbar                             button.chip[data-filter][aria-pressed] > span.n,
//                                           button#clear-finished
//   ul#tasks > li.task[data-task-id][data-state]   running first, then finished; newest first
//     [role=progressbar][aria-valuenow]     whole percent, absent while the total is unknown
//     .kind[data-kind]                      the kind's title (text), its name (attribute)
//     .state .pct .count .elapsed .rate .eta .message .error svg.spark polyline code.task-id
//     button.cancel                         only while queued or running
//   .toasts .toast                          a task finished (text names its final state)
//
// Every test gets a fresh browser context (Playwright's default), hence a
// fresh session cookie and an empty task list of its own.

export const TERMINAL_STATES = ['succeeded', 'failed', 'cancelled'];

/**
 * Playwright's `test`, with every page of the test watched for
 * Content-Security-Policy violations (the `securitypolicyviolation` event and
 * the console's report of it): any violation fails the test, unless it sets
 * `test.use({ allowCspViolations: true })` to look at `cspViolations` itself.
 */
export const test = base.extend<{ allowCspViolations: boolean; cspViolations: string[] }>({
  allowCspViolations: [false, { option: true }],
  cspViolations: [
    async ({ context, allowCspViolations }, use) => {
      const violations: string[] = [];
      context.on('console', (msg) => {
        if (/Content Security Policy/i.test(msg.text())) violations.push(msg.text());
      });
      await context.exposeBinding('__twCspViolation', (_source, text: string) => {
        violations.push(text);
      });
      // Init scripts run outside the page's CSP.
      await context.addInitScript(() => {
        document.addEventListener('securitypolicyviolation', (e) => {
          const report = (window as unknown as { __twCspViolation: (t: string) => void })
            .__twCspViolation;
          report(`${e.effectiveDirective} refused ${e.blockedURI || '(inline)'}`);
        });
      });
      await use(violations);
      if (!allowCspViolations) {
        expect(violations, 'no Content-Security-Policy violation in the browser').toEqual([]);
      }
    },
    { auto: true },
  ],
});
export { expect };

/** The repository root (the release binary runs from there). */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The server binary: TASKWIRE_BIN (relative to the repository root), else the release build. */
export const TASKWIRE_BIN = process.env.TASKWIRE_BIN ?? './target/release/taskwire';

export interface StartParams {
  durationMs: number;
  steps: number;
  failAt?: number;
}

/**
 * Surfaces browser-side failures (a wasm panic, a failed hydration) in the
 * test output; otherwise they only show up as a timeout.
 */
export function logBrowserErrors(page: Page): void {
  page.on('pageerror', (err) => console.log(`[browser pageerror] ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const text = msg.text();
    // The WebSocket of a server that was stopped on purpose.
    if (/WebSocket connection to .* failed/.test(text)) return;
    console.log(`[browser console.error] ${text}`);
  });
}

/** Waits until the page is hydrated and connected. */
export async function waitReady(page: Page): Promise<void> {
  // A click before the wasm has hydrated is lost.
  await expect(page.locator('main[data-hydrated="true"]')).toHaveCount(1, { timeout: 30_000 });
  await expect(page.locator('#conn')).toHaveAttribute('data-state', 'connected', {
    timeout: 15_000,
  });
}

/** Loads the page (at `url`, the config's baseURL by default) and waits until it is ready. */
export async function openApp(page: Page, url = '/'): Promise<void> {
  await page.goto(url);
  await waitReady(page);
}

/** The data-task-id of every listed task, in page order. */
export async function listedTaskIds(page: Page): Promise<string[]> {
  return page
    .locator('ul#tasks > li.task')
    .evaluateAll((items) => items.map((li) => li.getAttribute('data-task-id') ?? ''));
}

export function taskItem(page: Page, id: string): Locator {
  const quoted = id.replace(/\\/g, '\\\\').replace(/"/g, '\\"');
  return page.locator(`ul#tasks > li.task[data-task-id="${quoted}"]`);
}

export function progressBar(task: Locator): Locator {
  return task.locator('[role="progressbar"]');
}

/** Fills the start form's fields (without submitting). */
export async function fillForm(page: Page, params: StartParams): Promise<void> {
  const form = page.locator('form#start-form');
  await form.locator('input[name="duration_ms"]').fill(String(params.durationMs));
  await form.locator('input[name="steps"]').fill(String(params.steps));
  await form
    .locator('input[name="fail_at"]')
    .fill(params.failAt === undefined ? '' : String(params.failAt));
}

/**
 * Runs `action` and waits until exactly `count` new li.task appeared; returns
 * their ids. On failure the message includes what #start-error says.
 */
export async function expectNewTasks(
  page: Page,
  count: number,
  action: () => Promise<void>,
): Promise<string[]> {
  const before = new Set(await listedTaskIds(page));
  await action();
  let fresh: string[] = [];
  try {
    await expect
      .poll(
        async () => {
          fresh = (await listedTaskIds(page)).filter((id) => !before.has(id));
          return fresh.length;
        },
        { message: `exactly ${count} new li.task`, timeout: 15_000 },
      )
      .toBe(count);
  } catch (err) {
    const startError = page.locator('#start-error');
    const shown =
      (await startError.count()) > 0 ? await startError.innerText() : '(no #start-error)';
    throw new Error(`${(err as Error).message}\n#start-error: ${JSON.stringify(shown)}`);
  }
  for (const id of fresh) expect(id, 'a new task has a non-empty data-task-id').not.toBe('');
  expect(new Set(fresh).size, `new ids are distinct: ${JSON.stringify(fresh)}`).toBe(count);
  return fresh;
}

/** Fills the start form, clicks Start and returns the id of the new task. */
export async function startTask(page: Page, params: StartParams): Promise<string> {
  await fillForm(page, params);
  const [id] = await expectNewTasks(page, 1, () =>
    page.locator('form#start-form button[type="submit"]').click(),
  );
  // Newest first among running tasks: the new task heads the list.
  await expect(page.locator('ul#tasks > li.task').first()).toHaveAttribute('data-task-id', id);
  return id;
}

/** Parses aria-valuenow; null while absent (total unknown). */
export function parsePercent(raw: string | null): number | null {
  if (raw === null) return null;
  const n = Number(raw);
  expect(Number.isInteger(n), `aria-valuenow ${JSON.stringify(raw)} is a whole number`).toBe(true);
  expect(n).toBeGreaterThanOrEqual(0);
  expect(n).toBeLessThanOrEqual(100);
  return n;
}

/** The current aria-valuenow of a task's bar (null while absent). */
export async function percentOf(task: Locator): Promise<number | null> {
  return parsePercent(await progressBar(task).getAttribute('aria-valuenow'));
}

/** Asserts that the listed ids contain no duplicates and returns them. */
export async function expectNoDuplicates(page: Page): Promise<string[]> {
  const ids = await listedTaskIds(page);
  expect(new Set(ids).size, `no duplicate li.task: ${JSON.stringify(ids)}`).toBe(ids.length);
  return ids;
}

// ---------------------------------------------------------------------------
// Accessibility: axe-core (WCAG 2 A and AA) on the page as it is.

const AXE_PATH = createRequire(import.meta.url).resolve('axe-core/axe.min.js');

/**
 * Makes axe-core available on every page of the context loaded from now on.
 * An init script: it runs outside the page's CSP (a <script> tag added
 * later would be refused, and the CSP guard would fail the test).
 */
export async function installAxe(page: Page): Promise<void> {
  await page.context().addInitScript({ path: AXE_PATH });
}

interface AxeViolation {
  id: string;
  impact: string | null;
  help: string;
  nodes: { target: string[]; failureSummary?: string }[];
}

/** Runs axe-core (tags wcag2a, wcag2aa) and expects no violation; `what` names the case. */
export async function expectNoAxeViolations(page: Page, what: string): Promise<void> {
  const violations = await page.evaluate(async () => {
    const axe = (window as unknown as { axe: { run: (...a: unknown[]) => Promise<{ violations: AxeViolation[] }> } }).axe;
    const result = await axe.run(document, {
      runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa'] },
      resultTypes: ['violations'],
    });
    return result.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      nodes: v.nodes.map((n) => ({ target: n.target, failureSummary: n.failureSummary })),
    }));
  });
  const report = violations
    .map(
      (v) =>
        `${v.id} (${v.impact}): ${v.help}\n` +
        v.nodes.map((n) => `  ${n.target.join(' ')}: ${n.failureSummary ?? ''}`).join('\n'),
    )
    .join('\n');
  expect(violations.length, `axe-core, ${what}:\n${report}`).toBe(0);
}

// ---------------------------------------------------------------------------
// A taskwire server of a test's own (for stopping and restarting it).

/** A TCP port that was free a moment ago on 127.0.0.1. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

const scratch: string[] = [];

/** A fresh directory under the temp dir, removed when this process exits. */
export function scratchDir(prefix: string): string {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  if (scratch.length === 0) {
    process.once('exit', () => {
      for (const d of scratch) rmSync(d, { recursive: true, force: true });
    });
  }
  scratch.push(dir);
  return dir;
}

export class OwnServer {
  private child: ChildProcess | null = null;
  private output: string[] = [];
  /** Its own data directory, kept across stop and start (a restart keeps what it had). */
  readonly dataDir = scratchDir('taskwire-e2e-');

  /** `extra`: more arguments for the binary, e.g. `['--config', file]`. */
  constructor(
    readonly port: number,
    readonly extra: string[] = [],
  ) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts the release binary on this port and waits until it answers. */
  async start(): Promise<void> {
    expect(this.child, 'the server is not already running').toBeNull();
    const child = spawn(
      TASKWIRE_BIN,
      [
        '--listen',
        `127.0.0.1:${this.port}`,
        '--admin-listen',
        '127.0.0.1:0',
        '--poll-interval-ms',
        '200',
        '--data-dir',
        this.dataDir,
        ...this.extra,
      ],
      { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    this.child = child;
    const keep = (chunk: Buffer) => {
      this.output.push(chunk.toString());
      if (this.output.length > 200) this.output.shift();
    };
    child.stdout?.on('data', keep);
    child.stderr?.on('data', keep);

    const deadline = Date.now() + 30_000;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(
          `taskwire on port ${this.port} exited (${child.exitCode ?? child.signalCode}):\n${this.log()}`,
        );
      }
      try {
        const res = await fetch(`${this.url}/healthz`);
        if (res.ok) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) {
        throw new Error(`taskwire on port ${this.port} did not answer in 30 s:\n${this.log()}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** Stops the server with `signal` and waits until the process is gone. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.child = null;
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }

  log(): string {
    return this.output.join('');
  }
}
