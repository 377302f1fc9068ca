import {
  logBrowserErrors,
  openApp,
  percentOf,
  progressBar,
  startTask,
  taskItem,
  expect,
  test,
} from './helpers';

// Contract 1.1, section 1: every open connection of a session is subscribed
// to a task the session starts. Two pages of one browser context share the
// session cookie: a task started in one appears, moves and finishes in the
// other without a reload.

test('a task started in one tab appears and finishes in the other', async ({ context }) => {
  const first = await context.newPage();
  const second = await context.newPage();
  logBrowserErrors(first);
  logBrowserErrors(second);
  await openApp(first);
  await openApp(second);
  const id = await startTask(first, { durationMs: 2500, steps: 10 });
  const there = taskItem(second, id);
  await expect(there).toHaveCount(1, { timeout: 5_000 });
  await expect(progressBar(there)).toHaveAttribute('aria-valuenow', /\d+/);
  await expect(there).toHaveAttribute('data-state', 'succeeded', { timeout: 15_000 });
  expect(await percentOf(there)).toBe(100);
  await expect(taskItem(first, id)).toHaveAttribute('data-state', 'succeeded');
});
