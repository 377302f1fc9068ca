import { expect, logBrowserErrors, openApp, percentOf, startTask, taskItem, test } from './helpers';

// The connection indicator follows the browser's network state.

test.beforeEach(async ({ page }) => {
  logBrowserErrors(page);
});

// A short blip that does not break the WebSocket: the indicator follows the
// browser's offline/online events, and the page stays usable after.
test('a short network blip: offline, then connected again and usable', async ({
  page,
  context,
}) => {
  await openApp(page);
  const id = await startTask(page, { durationMs: 30_000, steps: 100 });
  const task = taskItem(page, id);
  await expect(task).toHaveAttribute('data-state', 'running');

  await context.setOffline(true);
  await expect(page.locator('#conn')).toHaveAttribute('data-state', 'offline');
  await expect(page.locator('#conn')).toHaveText(/offline/);

  await context.setOffline(false);
  const before = (await percentOf(task)) ?? 0;
  // Updates flow again ...
  await expect.poll(async () => (await percentOf(task)) ?? 0, { timeout: 10_000 }).toBeGreaterThan(
    before,
  );
  // ... so the page must say so, and let the user start tasks again.
  await expect(page.locator('#conn')).toHaveAttribute('data-state', 'connected', {
    timeout: 15_000,
  });
  const next = await startTask(page, { durationMs: 1000, steps: 5 });
  await expect(taskItem(page, next)).toHaveAttribute('data-state', 'succeeded');
});
