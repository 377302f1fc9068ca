import {
  TERMINAL_STATES,
  listedTaskIds,
  logBrowserErrors,
  openApp,
  parsePercent,
  progressBar,
  startTask,
  taskItem,
  waitReady,
  expect,
  test,
} from './helpers';

// The core flows: progress, cancel, reload, failure. The page's DOM contract
// is described in helpers.ts. Every test gets a fresh browser context, hence
// a fresh session cookie and an empty task list of its own.

test.beforeEach(async ({ page }) => {
  logBrowserErrors(page);
});

test("a task's progress bar rises to 100 and succeeds", async ({ page }) => {
  await openApp(page);
  await expect(page).toHaveTitle('taskwire');
  const id = await startTask(page, { durationMs: 3000, steps: 20 });
  const task = taskItem(page, id);
  const bar = progressBar(task);

  await expect(bar).toHaveAttribute('aria-valuemin', '0');
  await expect(bar).toHaveAttribute('aria-valuemax', '100');
  await expect(bar).toHaveAttribute('aria-label', /\S/);

  // Sample the card until the task finishes (or a deadline passes).
  interface Snap {
    state: string;
    now: string | null;
    rate: string;
    eta: string;
    title: string;
    points: number;
  }
  const samples: number[] = [];
  const running: Snap[] = [];
  let state = '';
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const snap: Snap = await task.evaluate((li) => ({
      state: li.getAttribute('data-state') ?? '',
      now: li.querySelector('[role="progressbar"]')?.getAttribute('aria-valuenow') ?? null,
      rate: li.querySelector('.rate')?.textContent?.trim() ?? '',
      eta: li.querySelector('.eta')?.textContent?.trim() ?? '',
      title: document.title,
      points: (li.querySelector('svg.spark polyline')?.getAttribute('points') ?? '')
        .trim()
        .split(/\s+/)
        .filter(Boolean).length,
    }));
    state = snap.state;
    const pct = parsePercent(snap.now);
    if (pct !== null) samples.push(pct);
    if (state === 'running') running.push(snap);
    if (TERMINAL_STATES.includes(state)) break;
    await page.waitForTimeout(100);
  }
  const trace = `samples: ${JSON.stringify(samples)}, last state: ${state}`;
  const runTrace = `running samples: ${JSON.stringify(running)}`;

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

  // While running: the title counts it, and rate and ETA are shown.
  expect(running.length, `seen running at least twice (${runTrace})`).toBeGreaterThanOrEqual(2);
  for (const s of running) {
    expect(s.title, `title while running (${runTrace})`).toBe('(1 running) taskwire');
  }
  const withRate = running.filter((s) => s.rate !== '' && s.eta !== '');
  expect(withRate.length, `.rate and .eta non-empty while running (${runTrace})`).toBeGreaterThan(0);
  for (const s of withRate) {
    expect(s.rate, runTrace).toMatch(/^\d+\.\d\/s$/);
    expect(s.eta, runTrace).toMatch(/^ETA \d/);
  }
  // The sparkline grows with the updates.
  expect(running[running.length - 1].points, `sparkline grows (${runTrace})`).toBeGreaterThan(
    running[0].points,
  );

  await expect(task).toHaveAttribute('data-state', 'succeeded');
  await expect(bar).toHaveAttribute('aria-valuenow', '100');
  await expect(task.locator('.state')).toHaveText('succeeded');
  await expect(task.locator('.pct')).toHaveText('100%');
  await expect(task.locator('.count')).toHaveText(/^\s*20\s*\/\s*20\s*$/);
  await expect(task.locator('button.cancel')).toHaveCount(0);
  await expect(task.locator('.eta')).toHaveText('');
  await expect(task.locator('code.task-id')).toHaveText(id);

  // Finished: the title no longer counts it, and a toast said so.
  await expect(page).toHaveTitle('taskwire');
  await expect(page.locator('.toasts .toast', { hasText: 'succeeded' })).toHaveCount(1);
  await expect(page.locator('.toasts .toast').first()).toContainText(id.slice(0, 9));

  const points = (await task.locator('svg.spark polyline').getAttribute('points')) ?? '';
  const pairs = points.trim().split(/\s+/).filter(Boolean);
  expect(pairs.length, `sparkline points: ${JSON.stringify(points)}`).toBeGreaterThanOrEqual(3);
  for (const p of pairs) expect(p).toMatch(/^\d+(\.\d+)?,\d+(\.\d+)?$/);

  // The toast goes away by itself (after about 6 s).
  await expect(page.locator('.toasts .toast')).toHaveCount(0, { timeout: 10_000 });
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
