import {
  expectNoAxeViolations,
  fillForm,
  installAxe,
  logBrowserErrors,
  openApp,
  percentOf,
  startTask,
  taskItem,
  expect,
  test,
} from './helpers';

// Accessibility: axe-core finds no WCAG 2 A/AA violation on the page, in the
// light and the dark theme, with tasks in every state, a toast, a pressed
// filter chip and a field error on screen.

test.beforeEach(async ({ page }) => {
  logBrowserErrors(page);
});

test('axe-core finds no WCAG 2 A/AA violation, light and dark', async ({ page }) => {
  await installAxe(page);
  await openApp(page);

  const cancelled = await startTask(page, { durationMs: 60_000, steps: 100 });
  const succeeded = await startTask(page, { durationMs: 1000, steps: 5 });
  const failed = await startTask(page, { durationMs: 1500, steps: 10, failAt: 4 });
  const running = await startTask(page, { durationMs: 60_000, steps: 200 });
  await taskItem(page, cancelled).locator('button.cancel').click();
  await expect(taskItem(page, cancelled)).toHaveAttribute('data-state', 'cancelled');
  await expect(taskItem(page, succeeded)).toHaveAttribute('data-state', 'succeeded');
  await expect(taskItem(page, failed)).toHaveAttribute('data-state', 'failed');
  await expect(taskItem(page, running)).toHaveAttribute('data-state', 'running');
  await expect.poll(async () => (await percentOf(taskItem(page, running))) ?? 0).toBeGreaterThan(0);
  await expect(page.locator('.toasts .toast').first()).toBeVisible();
  await expect(page.locator('nav.toolbar button.chip[aria-pressed="true"]')).toHaveCount(1);

  // A field error on screen too (nothing is sent).
  await fillForm(page, { durationMs: 1000, steps: 0 });
  await page.locator('form#start-form button[type="submit"]').click();
  await expect(page.locator('#err-steps')).toHaveText(/\S/);

  for (const scheme of ['light', 'dark'] as const) {
    await page.emulateMedia({ colorScheme: scheme });
    await expect
      .poll(() => page.evaluate(() => matchMedia('(prefers-color-scheme: dark)').matches))
      .toBe(scheme === 'dark');
    // Let the bar's width transition settle (axe reads computed colours).
    await page.waitForTimeout(500);
    await expectNoAxeViolations(page, `${scheme} theme`);
  }

  await taskItem(page, running).locator('button.cancel').click();
  await expect(taskItem(page, running)).toHaveAttribute('data-state', 'cancelled');
});
