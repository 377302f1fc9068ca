import {
  OwnServer,
  freePort,
  listedTaskIds,
  logBrowserErrors,
  openApp,
  percentOf,
  startTask,
  taskItem,
  waitReady,
  expect,
  test,
} from './helpers';

// Stopping the server under a watching page and starting it again. This test
// runs a taskwire of its own (not the config's webServer) on a free port.

let server: OwnServer | null = null;

test.afterEach(async ({}, testInfo) => {
  if (server) {
    if (testInfo.status !== testInfo.expectedStatus) {
      await testInfo.attach('taskwire.log', { body: server.log(), contentType: 'text/plain' });
    }
    await server.stop('SIGKILL');
    server = null;
  }
});

test('stop the server mid-run and start it again', async ({ page }) => {
  test.setTimeout(120_000);
  logBrowserErrors(page);
  server = new OwnServer(await freePort());
  await server.start();

  await openApp(page, `${server.url}/`);
  const id = await startTask(page, { durationMs: 60_000, steps: 100 });
  const task = taskItem(page, id);
  await expect(task).toHaveAttribute('data-state', 'running');
  await expect.poll(async () => (await percentOf(task)) ?? 0).toBeGreaterThan(0);

  // Record any moment the list holds the same task twice.
  await page.evaluate(() => {
    const w = window as unknown as { __twDuplicates: string[][] };
    w.__twDuplicates = [];
    const check = () => {
      const ids = [...document.querySelectorAll('ul#tasks > li.task')].map(
        (li) => li.getAttribute('data-task-id') ?? '',
      );
      if (new Set(ids).size !== ids.length) w.__twDuplicates.push(ids);
    };
    new MutationObserver(check).observe(document.body, {
      subtree: true,
      childList: true,
      attributes: true,
      attributeFilter: ['data-task-id'],
    });
  });

  // Stop it: the page says it is reconnecting, and keeps what it knew.
  await server.stop('SIGTERM');
  const conn = page.locator('#conn');
  await expect(conn).toHaveAttribute('data-state', 'reconnecting', { timeout: 10_000 });
  await expect(conn).toHaveText(/^\s*reconnecting(…| in \d+ s)\s*$/);
  expect(await listedTaskIds(page)).toEqual([id]);

  // Sample the indicator for a few seconds while the server is down: it never
  // claims to be connected, and the countdown shows up.
  const seen = new Set<string>();
  const texts = new Set<string>();
  const until = Date.now() + 4_000;
  while (Date.now() < until) {
    seen.add((await conn.getAttribute('data-state')) ?? '');
    texts.add((await conn.innerText()).trim());
    await page.waitForTimeout(100);
  }
  expect([...seen].sort(), `states while down: ${[...seen]}`).not.toContain('connected');
  for (const t of texts) {
    expect(t, `texts while down: ${JSON.stringify([...texts])}`).toMatch(
      /^(reconnecting…|reconnecting in \d+ s|connecting…)$/,
    );
  }

  // Start it again on the same port (same data directory): connected again,
  // the same session and its task, which carries on where it was.
  const before = (await percentOf(task)) ?? 0;
  await server.start();
  await expect(conn).toHaveAttribute('data-state', 'connected', { timeout: 30_000 });
  await expect(conn).toHaveText(/^\s*connected\s*$/);
  expect(await listedTaskIds(page)).toEqual([id]);
  await expect(task).toHaveAttribute('data-state', 'running');
  await expect.poll(async () => (await percentOf(task)) ?? 0, { timeout: 10_000 }).toBeGreaterThan(before);

  // The restarted server works from this page, with no ghosts.
  const fresh = await startTask(page, { durationMs: 1000, steps: 5 });
  expect(fresh).not.toBe(id);
  await expect(taskItem(page, fresh)).toHaveAttribute('data-state', 'succeeded');
  expect((await listedTaskIds(page)).sort()).toEqual([id, fresh].sort());

  const duplicates = await page.evaluate(
    () => (window as unknown as { __twDuplicates: string[][] }).__twDuplicates,
  );
  expect(duplicates, 'no duplicate li.task at any time').toEqual([]);

  // The cookie still names the session: a reload shows both tasks.
  await page.reload();
  await waitReady(page);
  expect((await listedTaskIds(page)).sort()).toEqual([id, fresh].sort());
  await expect(taskItem(page, fresh)).toHaveAttribute('data-state', 'succeeded');
});
