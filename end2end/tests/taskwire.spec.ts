import { test, expect, type Locator, type Page } from '@playwright/test';

// The page's DOM contract:
//   main[data-hydrated="true"]              once the wasm has hydrated
//   #conn[data-state]                       connecting | connected | reconnecting
//   form#start-form                         input[name=duration_ms|steps|fail_at], button[type=submit]
//   #start-error                            field errors
//   ul#tasks > li.task[data-task-id][data-state]   newest first
//     [role=progressbar][aria-valuenow]     whole percent, absent while the total is unknown
//     .state .pct .count .message .error    button.cancel only while queued or running
//
// Every test gets a fresh browser context (Playwright's default), hence a
// fresh session cookie and an empty task list of its own.

const TERMINAL_STATES = ['succeeded', 'failed', 'cancelled'];

interface StartParams {
  durationMs: number;
  steps: number;
  failAt?: number;
}

test.beforeEach(async ({ page }) => {
  // Surface browser-side failures (a wasm panic, a failed hydration) in the
  // test output; otherwise they only show up as a timeout.
  page.on('pageerror', (err) => console.log(`[browser pageerror] ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') console.log(`[browser console.error] ${msg.text()}`);
  });
});

/** Loads (or reloads) the page and waits until it is hydrated and connected. */
async function waitReady(page: Page): Promise<void> {
  // A click before the wasm has hydrated is lost.
  await expect(page.locator('main[data-hydrated="true"]')).toHaveCount(1, { timeout: 30_000 });
  await expect(page.locator('#conn')).toHaveAttribute('data-state', 'connected', {
    timeout: 15_000,
  });
}

async function openApp(page: Page): Promise<void> {
  await page.goto('/');
  await waitReady(page);
}

/** The data-task-id of every listed task, in page order (newest first). */
async function listedTaskIds(page: Page): Promise<string[]> {
  return page
    .locator('ul#tasks > li.task')
    .evaluateAll((items) => items.map((li) => li.getAttribute('data-task-id') ?? ''));
}

function taskItem(page: Page, id: string): Locator {
  const quoted = id.replace(/\\/g, '\\\\').replace(/"/g, '\\"');
  return page.locator(`ul#tasks > li.task[data-task-id="${quoted}"]`);
}

function progressBar(task: Locator): Locator {
  return task.locator('[role="progressbar"]');
}

/** Fills the start form, clicks Start and returns the id of the new task. */
async function startTask(page: Page, params: StartParams): Promise<string> {
  const before = new Set(await listedTaskIds(page));

  const form = page.locator('form#start-form');
  await form.locator('input[name="duration_ms"]').fill(String(params.durationMs));
  await form.locator('input[name="steps"]').fill(String(params.steps));
  await form
    .locator('input[name="fail_at"]')
    .fill(params.failAt === undefined ? '' : String(params.failAt));
  await form.locator('button[type="submit"]').click();

  let fresh: string[] = [];
  try {
    await expect
      .poll(
        async () => {
          fresh = (await listedTaskIds(page)).filter((id) => !before.has(id));
          return fresh.length;
        },
        { message: 'exactly one new li.task after clicking Start', timeout: 15_000 },
      )
      .toBe(1);
  } catch (err) {
    const startError = page.locator('#start-error');
    const shown = (await startError.count()) > 0 ? await startError.innerText() : '(no #start-error)';
    throw new Error(`${(err as Error).message}\n#start-error: ${JSON.stringify(shown)}`);
  }

  const id = fresh[0];
  expect(id, 'the new task has a non-empty data-task-id').not.toBe('');
  // Newest first: the new task heads the list.
  await expect(page.locator('ul#tasks > li.task').first()).toHaveAttribute('data-task-id', id);
  return id;
}

/** Parses aria-valuenow; null while absent (total unknown). */
function parsePercent(raw: string | null): number | null {
  if (raw === null) return null;
  const n = Number(raw);
  expect(Number.isInteger(n), `aria-valuenow ${JSON.stringify(raw)} is a whole number`).toBe(true);
  expect(n).toBeGreaterThanOrEqual(0);
  expect(n).toBeLessThanOrEqual(100);
  return n;
}

test("a task's progress bar rises to 100 and succeeds", async ({ page }) => {
  await openApp(page);
  const id = await startTask(page, { durationMs: 3000, steps: 20 });
  const task = taskItem(page, id);
  const bar = progressBar(task);

  await expect(bar).toHaveAttribute('aria-valuemin', '0');
  await expect(bar).toHaveAttribute('aria-valuemax', '100');

  // Sample the bar until the task finishes (or a deadline passes).
  const samples: number[] = [];
  let state = '';
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const snap = await task.evaluate((li) => ({
      state: li.getAttribute('data-state') ?? '',
      now: li.querySelector('[role="progressbar"]')?.getAttribute('aria-valuenow') ?? null,
    }));
    state = snap.state;
    const pct = parsePercent(snap.now);
    if (pct !== null) samples.push(pct);
    if (TERMINAL_STATES.includes(state)) break;
    await page.waitForTimeout(100);
  }
  const trace = `samples: ${JSON.stringify(samples)}, last state: ${state}`;

  // Never goes backwards.
  for (let i = 1; i < samples.length; i++) {
    expect(samples[i], `progress is non-decreasing (${trace})`).toBeGreaterThanOrEqual(
      samples[i - 1],
    );
  }
  // Visibly moved through intermediate values, not just 0 → 100.
  const intermediate = [...new Set(samples.filter((p) => p > 0 && p < 100))];
  expect(
    intermediate.length,
    `at least 2 distinct values strictly between 0 and 100 (${trace})`,
  ).toBeGreaterThanOrEqual(2);

  await expect(task).toHaveAttribute('data-state', 'succeeded');
  await expect(bar).toHaveAttribute('aria-valuenow', '100');
  await expect(task.locator('.state')).toHaveText('succeeded');
  await expect(task.locator('.pct')).toHaveText('100%');
  await expect(task.locator('.count')).toHaveText(/^\s*20\s*\/\s*20\s*$/);
  await expect(task.locator('button.cancel')).toHaveCount(0);
});

test('cancel stops a running task', async ({ page }) => {
  await openApp(page);
  const id = await startTask(page, { durationMs: 60_000, steps: 100 });
  const task = taskItem(page, id);

  await expect(task).toHaveAttribute('data-state', 'running', { timeout: 15_000 });
  const cancel = task.locator('button.cancel');
  await expect(cancel).toBeVisible();
  await cancel.click();

  await expect(task).toHaveAttribute('data-state', 'cancelled');
  await expect(task.locator('.state')).toHaveText('cancelled');
  await expect(cancel).toHaveCount(0);

  // It stopped well short of the end.
  const now = parsePercent(await progressBar(task).getAttribute('aria-valuenow'));
  if (now !== null) expect(now).toBeLessThan(100);
});

test("a reload shows the session's tasks, finished ones included", async ({ page }) => {
  await openApp(page);

  const shortId = await startTask(page, { durationMs: 2000, steps: 10 });
  const longId = await startTask(page, { durationMs: 60_000, steps: 100 });
  expect(longId).not.toBe(shortId);

  const longTask = taskItem(page, longId);
  await expect(longTask).toHaveAttribute('data-state', 'running', { timeout: 15_000 });
  await longTask.locator('button.cancel').click();
  await expect(longTask).toHaveAttribute('data-state', 'cancelled');
  await expect(taskItem(page, shortId)).toHaveAttribute('data-state', 'succeeded', {
    timeout: 20_000,
  });

  await page.reload();
  await waitReady(page);

  const shortAfter = taskItem(page, shortId);
  const longAfter = taskItem(page, longId);
  await expect(shortAfter).toHaveAttribute('data-state', 'succeeded');
  await expect(shortAfter.locator('.state')).toHaveText('succeeded');
  await expect(progressBar(shortAfter)).toHaveAttribute('aria-valuenow', '100');
  await expect(longAfter).toHaveAttribute('data-state', 'cancelled');
  await expect(longAfter.locator('.state')).toHaveText('cancelled');
  await expect(longAfter.locator('button.cancel')).toHaveCount(0);

  // Still newest first, and nothing else from elsewhere in the list.
  expect(await listedTaskIds(page)).toEqual([longId, shortId]);
});

test('a fail_at task shows its error', async ({ page }) => {
  await openApp(page);
  const id = await startTask(page, { durationMs: 2000, steps: 10, failAt: 5 });
  const task = taskItem(page, id);

  await expect(task).toHaveAttribute('data-state', 'failed', { timeout: 20_000 });
  await expect(task.locator('.state')).toHaveText('failed');
  await expect(task.locator('.error')).toHaveText(/\S/);
  await expect(progressBar(task)).toHaveAttribute('aria-valuenow', '50');
  await expect(task.locator('button.cancel')).toHaveCount(0);
});
