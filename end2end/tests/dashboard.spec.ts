import { type Page } from '@playwright/test';
import {
  expectNewTasks,
  expectNoDuplicates,
  fillForm,
  listedTaskIds,
  logBrowserErrors,
  openApp,
  percentOf,
  progressBar,
  startTask,
  taskItem,
  waitReady,
  expect,
  test,
} from './helpers';

// "A page people enjoy watching": batches, reloads mid-run, light and dark,
// the server-rendered list, form validation, filters, the keyboard.
// The page's DOM contract is described in helpers.ts.

test.beforeEach(async ({ page }) => {
  logBrowserErrors(page);
});

function chip(page: Page, filter: string) {
  return page.locator(`nav.toolbar button.chip[data-filter="${filter}"]`);
}

/** The `taskwire_session` cookie of the page's browser context. */
async function sessionCookie(page: Page): Promise<string> {
  const cookies = await page.context().cookies();
  const session = cookies.find((c) => c.name === 'taskwire_session');
  expect(session, `taskwire_session among ${JSON.stringify(cookies.map((c) => c.name))}`).toBeTruthy();
  return `taskwire_session=${session!.value}`;
}

/** `GET /` without a browser: no JS, no cookie jar. */
async function fetchPage(baseURL: string, cookie?: string): Promise<Response> {
  return fetch(`${baseURL}/`, { headers: cookie ? { Cookie: cookie } : {} });
}

/** Every `<li class="task">` of server-rendered HTML: its id and state. */
function renderedTasks(html: string): { id: string; state: string }[] {
  const out: { id: string; state: string }[] = [];
  for (const m of html.matchAll(/<li\b[^>]*>/g)) {
    const tag = m[0];
    const attr = (name: string) => tag.match(new RegExp(`\\s${name}="([^"]*)"`))?.[1];
    if (!(attr('class') ?? '').split(/\s+/).includes('task')) continue;
    out.push({ id: attr('data-task-id') ?? '', state: attr('data-state') ?? '' });
  }
  return out;
}

test('start 10 at once and see all 10 finish', async ({ page }) => {
  await openApp(page);
  await fillForm(page, { durationMs: 3000, steps: 30 });
  const ids = await expectNewTasks(page, 10, () => page.locator('button#start-10').click());

  await expect(page.locator('#start-error')).toHaveText('');
  await expect(chip(page, 'all').locator('span.n')).toHaveText('10');
  await expect(page).toHaveTitle('(10 running) taskwire');

  for (const id of ids) {
    const task = taskItem(page, id);
    await expect(task).toHaveAttribute('data-state', 'succeeded', { timeout: 20_000 });
    await expect(progressBar(task)).toHaveAttribute('aria-valuenow', '100');
    await expect(task.locator('.count')).toHaveText(/^\s*30\s*\/\s*30\s*$/);
  }
  await expect(chip(page, 'succeeded').locator('span.n')).toHaveText('10');
  await expect(chip(page, 'running').locator('span.n')).toHaveText('0');
  await expect(page).toHaveTitle('taskwire');
  expect((await expectNoDuplicates(page)).sort()).toEqual([...ids].sort());

  // Toasts for the finished tasks, but never more than a handful at once.
  const toasts = await page.locator('.toasts .toast').count();
  expect(toasts).toBeGreaterThanOrEqual(1);
  expect(toasts).toBeLessThanOrEqual(5);
});

test('reload mid-run and see the same tasks continue', async ({ page }) => {
  await openApp(page);
  const a = await startTask(page, { durationMs: 6000, steps: 60 });
  const b = await startTask(page, { durationMs: 6000, steps: 60 });

  // About 1.5 s in, both well under way.
  for (const id of [a, b]) {
    await expect
      .poll(async () => (await percentOf(taskItem(page, id))) ?? 0, { timeout: 10_000 })
      .toBeGreaterThanOrEqual(20);
  }
  const before = new Map<string, number>();
  for (const id of [a, b]) before.set(id, (await percentOf(taskItem(page, id))) ?? 0);
  for (const id of [a, b]) {
    expect(before.get(id)!, `task ${id} is mid-run at the reload`).toBeLessThan(100);
  }

  await page.reload();
  await waitReady(page);

  // The same tasks, nothing else, still running, not gone backwards.
  expect((await expectNoDuplicates(page)).sort()).toEqual([a, b].sort());
  for (const id of [a, b]) {
    const task = taskItem(page, id);
    await expect(task.locator('code.task-id')).toHaveText(id);
    const now = (await percentOf(task)) ?? 0;
    expect(now, `task ${id} after the reload`).toBeGreaterThanOrEqual(before.get(id)!);
  }
  // ... and they keep rising, to the end.
  for (const id of [a, b]) {
    const task = taskItem(page, id);
    const first = (await percentOf(task)) ?? 0;
    if (first < 100) {
      await expect
        .poll(async () => (await percentOf(task)) ?? 0, {
          message: `task ${id} keeps rising after the reload`,
          timeout: 10_000,
        })
        .toBeGreaterThan(first);
    }
  }
  for (const id of [a, b]) {
    const task = taskItem(page, id);
    await expect(task).toHaveAttribute('data-state', 'succeeded', { timeout: 15_000 });
    await expect(progressBar(task)).toHaveAttribute('aria-valuenow', '100');
  }
  expect((await expectNoDuplicates(page)).sort()).toEqual([a, b].sort());
});

test('screenshots in light and dark', async ({ page }, testInfo) => {
  await page.emulateMedia({ colorScheme: 'light' });
  await openApp(page);

  // One task of each state.
  const cancelled = await startTask(page, { durationMs: 60_000, steps: 100 });
  const succeeded = await startTask(page, { durationMs: 1000, steps: 5 });
  const failed = await startTask(page, { durationMs: 1500, steps: 10, failAt: 4 });
  const running = await startTask(page, { durationMs: 60_000, steps: 200 });
  await expect(taskItem(page, cancelled)).toHaveAttribute('data-state', 'running');
  await taskItem(page, cancelled).locator('button.cancel').click();
  await expect(taskItem(page, cancelled)).toHaveAttribute('data-state', 'cancelled');
  await expect(taskItem(page, succeeded)).toHaveAttribute('data-state', 'succeeded');
  await expect(taskItem(page, failed)).toHaveAttribute('data-state', 'failed');
  await expect(taskItem(page, running)).toHaveAttribute('data-state', 'running');
  await expect.poll(async () => (await percentOf(taskItem(page, running))) ?? 0).toBeGreaterThan(0);

  // The toasts cover no state badge, bar or button: at this (desktop) width
  // they sit in the margin beside the content column, whatever the scroll.
  await expect(page.locator('.toasts .toast').first()).toBeVisible();
  expect(await toastsOverlap(page)).toEqual([]);

  const backgrounds: Record<string, string> = {};
  for (const scheme of ['light', 'dark'] as const) {
    await page.emulateMedia({ colorScheme: scheme });
    await expect
      .poll(() => page.evaluate(() => matchMedia('(prefers-color-scheme: dark)').matches))
      .toBe(scheme === 'dark');
    backgrounds[scheme] = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    const file = testInfo.outputPath(`dashboard-${scheme}.png`);
    await page.screenshot({ path: file, fullPage: true });
    await testInfo.attach(`dashboard-${scheme}`, { path: file, contentType: 'image/png' });
  }

  expect(backgrounds.light, JSON.stringify(backgrounds)).not.toBe(backgrounds.dark);
  // And the dark one is the darker.
  const luminance = (css: string) => {
    const [r, g, b] = (css.match(/\d+(\.\d+)?/g) ?? ['0', '0', '0']).map(Number);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  expect(luminance(backgrounds.dark), JSON.stringify(backgrounds)).toBeLessThan(
    luminance(backgrounds.light),
  );

  // At phone width the toasts follow the list (sticking to the viewport's
  // bottom while it runs on below): at the end of the page they cover nothing.
  await page.emulateMedia({ colorScheme: 'light' });
  await page.setViewportSize({ width: 390, height: 844 });
  await taskItem(page, running).locator('button.cancel').click();
  await expect(taskItem(page, running)).toHaveAttribute('data-state', 'cancelled');
  await expect(page.locator('.toasts .toast').first()).toBeVisible();
  await page.evaluate(() => window.scrollTo(0, document.documentElement.scrollHeight));
  expect(await toastsOverlap(page)).toEqual([]);
  const phone = testInfo.outputPath('dashboard-phone.png');
  await page.screenshot({ path: phone, fullPage: true });
  await testInfo.attach('dashboard-phone', { path: phone, contentType: 'image/png' });
});

/** Which toasts cover a state badge, a bar or a button on the screen (none, one hopes). */
async function toastsOverlap(page: Page): Promise<string[]> {
  return page.evaluate(() => {
    const boxes = (sel: string) =>
      [...document.querySelectorAll(sel)].map((e) => ({ e, r: e.getBoundingClientRect() }));
    const hit = (a: DOMRect, b: DOMRect) =>
      a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
    const covered = boxes('.badge, .bar, .task button, #start-form button, nav.toolbar button');
    return boxes('.toasts .toast').flatMap((t) =>
      covered
        .filter((c) => hit(t.r, c.r))
        .map((c) => `${t.e.textContent} covers ${c.e.className || c.e.tagName}`),
    );
  });
}

test("the server renders the session's tasks into the page", async ({ page, baseURL }) => {
  await openApp(page);
  const done = await startTask(page, { durationMs: 1000, steps: 5 });
  const live = await startTask(page, { durationMs: 60_000, steps: 100 });
  await expect(taskItem(page, done)).toHaveAttribute('data-state', 'succeeded');
  await expect(taskItem(page, live)).toHaveAttribute('data-state', 'running');
  const cookie = await sessionCookie(page);

  // With the session's cookie: both tasks, in their states, before any JS.
  const res = await fetchPage(baseURL!, cookie);
  expect(res.status).toBe(200);
  expect(res.headers.get('set-cookie'), 'a known session gets no new cookie').toBeNull();
  const html = await res.text();
  expect(html).toContain(`data-task-id="${done}"`);
  expect(html).toContain(`data-task-id="${live}"`);
  const rendered = renderedTasks(html);
  expect(rendered, html).toEqual([
    { id: live, state: 'running' },
    { id: done, state: 'succeeded' },
  ]);
  expect(html).toMatch(/<title>\(1 running\) taskwire<\/title>/);

  // Without a cookie: a new session, and no tasks at all.
  const fresh = await fetchPage(baseURL!);
  expect(fresh.status).toBe(200);
  expect(fresh.headers.get('set-cookie') ?? '').toMatch(/^taskwire_session=[0-9a-f]+;/);
  const freshHtml = await fresh.text();
  expect(renderedTasks(freshHtml)).toEqual([]);
  expect(freshHtml).not.toMatch(/<li\b[^>]*class="task"/);
  expect(freshHtml).not.toContain(done);
  expect(freshHtml).not.toContain(live);

  // Someone else's (made-up) token: a new session too, never this one's tasks.
  const other = await fetchPage(baseURL!, `taskwire_session=${'0'.repeat(32)}`);
  const otherHtml = await other.text();
  expect(renderedTasks(otherHtml)).toEqual([]);
  expect(otherHtml).not.toContain(live);

  await taskItem(page, live).locator('button.cancel').click();
  await expect(taskItem(page, live)).toHaveAttribute('data-state', 'cancelled');
});

test('the form checks its fields before sending anything', async ({ page }) => {
  await openApp(page);
  const form = page.locator('form#start-form');
  const input = (name: string) => form.locator(`input[name="${name}"]`);
  const submit = form.locator('button[type="submit"]');

  // steps 0
  await fillForm(page, { durationMs: 1000, steps: 0 });
  await submit.click();
  await expect(page.locator('#err-steps')).toHaveText(/\S/);
  await expect(input('steps')).toHaveAttribute('aria-invalid', 'true');
  await expect(input('duration_ms')).not.toHaveAttribute('aria-invalid', 'true');
  await expect(input('fail_at')).not.toHaveAttribute('aria-invalid', 'true');
  await expect(page.locator('#err-duration_ms')).toHaveText('');
  // "Start 10" checks the same.
  await page.locator('button#start-10').click();
  await expect(page.locator('#err-steps')).toHaveText(/\S/);

  // fail_at past the last step
  await fillForm(page, { durationMs: 1000, steps: 10, failAt: 11 });
  await submit.click();
  await expect(page.locator('#err-fail_at')).toHaveText(/\S/);
  await expect(input('fail_at')).toHaveAttribute('aria-invalid', 'true');
  await expect(page.locator('#err-steps')).toHaveText('');
  await expect(input('steps')).not.toHaveAttribute('aria-invalid', 'true');

  // duration 0
  await fillForm(page, { durationMs: 0, steps: 10 });
  await submit.click();
  await expect(page.locator('#err-duration_ms')).toHaveText(/\S/);
  await expect(input('duration_ms')).toHaveAttribute('aria-invalid', 'true');
  await expect(page.locator('#err-fail_at')).toHaveText('');

  // Nothing was sent: no task, and no error back from the server.
  await page.waitForTimeout(500);
  await expect(page.locator('ul#tasks > li.task')).toHaveCount(0);
  await expect(page.locator('#start-error')).not.toContainText('invalid_params');

  // Fixed: the errors go, and exactly one task starts.
  const id = await startTask(page, { durationMs: 1000, steps: 10, failAt: 10 });
  for (const name of ['duration_ms', 'steps', 'fail_at']) {
    await expect(page.locator(`#err-${name}`)).toHaveText('');
    await expect(input(name)).not.toHaveAttribute('aria-invalid', 'true');
  }
  await expect(page.locator('#start-error')).toHaveText('');
  expect(await listedTaskIds(page)).toEqual([id]);
});

test('filters and clear finished', async ({ page, baseURL }) => {
  await openApp(page);
  const clear = page.locator('button#clear-finished');
  await expect(clear).toBeDisabled();

  const running = await startTask(page, { durationMs: 60_000, steps: 100 });
  const finished = await startTask(page, { durationMs: 1000, steps: 5 });
  await expect(taskItem(page, finished)).toHaveAttribute('data-state', 'succeeded');
  await expect(taskItem(page, running)).toHaveAttribute('data-state', 'running');
  // Running first, although the finished one is newer.
  expect(await listedTaskIds(page)).toEqual([running, finished]);

  const counts = { all: '2', running: '1', succeeded: '1', failed: '0', cancelled: '0' };
  for (const [f, n] of Object.entries(counts)) {
    await expect(chip(page, f).locator('span.n')).toHaveText(n);
  }
  await expect(chip(page, 'all')).toHaveAttribute('aria-pressed', 'true');

  const shows = async (filter: string, ids: string[]) => {
    await chip(page, filter).click();
    for (const f of Object.keys(counts)) {
      await expect(chip(page, f)).toHaveAttribute('aria-pressed', String(f === filter));
    }
    await expect.poll(() => listedTaskIds(page), { message: `filter ${filter}` }).toEqual(ids);
  };
  await shows('running', [running]);
  await shows('succeeded', [finished]);
  await shows('failed', []);
  await shows('cancelled', []);
  await shows('all', [running, finished]);

  // Clear finished: gone from the list and from the server.
  await expect(clear).toBeEnabled();
  await clear.click();
  await expect.poll(() => listedTaskIds(page)).toEqual([running]);
  await expect(clear).toBeDisabled();
  await expect(chip(page, 'all').locator('span.n')).toHaveText('1');
  await expect(chip(page, 'succeeded').locator('span.n')).toHaveText('0');
  const cookie = await sessionCookie(page);
  await expect
    .poll(async () => renderedTasks(await (await fetchPage(baseURL!, cookie)).text()), {
      message: 'the server forgot the finished task',
    })
    .toEqual([{ id: running, state: 'running' }]);

  await page.reload();
  await waitReady(page);
  expect(await listedTaskIds(page)).toEqual([running]);
  await expect(taskItem(page, running)).toHaveAttribute('data-state', 'running');

  await taskItem(page, running).locator('button.cancel').click();
  await expect(taskItem(page, running)).toHaveAttribute('data-state', 'cancelled');
});

test('the keyboard alone starts a task', async ({ page }) => {
  await openApp(page);
  const form = page.locator('form#start-form');

  await form.locator('input[name="duration_ms"]').focus();
  await page.keyboard.press('ControlOrMeta+a');
  await page.keyboard.type('1500');
  await page.keyboard.press('Tab');
  await expect(form.locator('input[name="steps"]')).toBeFocused();
  await page.keyboard.press('ControlOrMeta+a');
  await page.keyboard.type('6');
  await page.keyboard.press('Tab');
  await expect(form.locator('input[name="fail_at"]')).toBeFocused();
  await page.keyboard.press('Tab');
  await expect(form.locator('button[type="submit"]')).toBeFocused();

  const [id] = await expectNewTasks(page, 1, () => page.keyboard.press('Enter'));
  const task = taskItem(page, id);
  await expect(task.locator('.params')).toHaveText('6 over 1.5 s');
  await expect(task).toHaveAttribute('data-state', 'succeeded', { timeout: 15_000 });
  await expect(task.locator('.count')).toHaveText(/^\s*6\s*\/\s*6\s*$/);
});
