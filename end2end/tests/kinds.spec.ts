import { createServer, type Server } from 'node:http';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import {
  OwnServer,
  expectNewTasks,
  expectNoAxeViolations,
  freePort,
  installAxe,
  logBrowserErrors,
  openApp,
  progressBar,
  scratchDir,
  taskItem,
  expect,
  test,
} from './helpers';

// The page starts any kind: it lists the configured kinds and renders each
// one's form from its schema. Here a taskwire of the test's own has two
// backends, the embedded simulator and a job service of the test's own
// (spoken to by the declarative `http` adapter, docs/http-adapter.md), and
// a kind on each. The page's DOM contract is described in helpers.ts.

test.beforeEach(async ({ page }) => {
  logBrowserErrors(page);
});

/**
 * A tiny job service: `POST /v1/jobs {type, input: {n}}` answers
 * `{name}`; `GET /v1/<name>` answers `{metadata: {state, done, total,
 * message}}`, counting to `n` over 2 s. `n` = 13 is refused (422) with a
 * message naming the field, as the engine's own checks do.
 */
function jobService(): { server: Server; starts: unknown[] } {
  const jobs = new Map<string, { at: number; total: number }>();
  const starts: unknown[] = [];
  const server = createServer((req, res) => {
    const send = (status: number, body: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    let raw = '';
    req.on('data', (c: Buffer) => (raw += c.toString()));
    req.on('end', () => {
      const url = req.url ?? '';
      if (req.method === 'POST' && url === '/v1/jobs') {
        const body = JSON.parse(raw || '{}');
        starts.push(body);
        const n = Number(body?.input?.n);
        if (n === 13) return send(422, { error: { message: 'n: 13 is an unlucky number' } });
        const name = `job${jobs.size + 1}`;
        jobs.set(name, { at: Date.now(), total: n });
        return send(200, { name });
      }
      const job = req.method === 'GET' ? jobs.get(url.replace(/^\/v1\//, '')) : undefined;
      if (!job) return send(404, { error: 'not found' });
      const done = Math.min(job.total, Math.floor(((Date.now() - job.at) / 2000) * job.total));
      const state = done >= job.total ? 'SUCCEEDED' : 'RUNNING';
      return send(200, {
        metadata: { state, done, total: job.total, message: `counted ${done} of ${job.total}` },
      });
    });
  });
  return { server, starts };
}

function configFile(jobsPort: number): string {
  const dir = scratchDir('taskwire-e2e-kinds-');
  const file = path.join(dir, 'taskwire.toml');
  writeFileSync(
    file,
    `
[[backend]]
name = "sim"
adapter = "embedded"

[[backend]]
name = "jobs"
adapter = "http"
url = "http://127.0.0.1:${jobsPort}"
start = { method = "POST", path = "/v1/jobs", body = { type = "{kind}", input = "{params}" }, id = "/name" }
status = { method = "GET", path = "/v1/{id}" }

[backend.fields]
state = "/metadata/state"
done = "/metadata/done"
total = "/metadata/total"
message = "/metadata/message"

[backend.states]
RUNNING = "running"
SUCCEEDED = "succeeded"

[[kind]]
name = "simulate"
backend = "sim"
title = "Simulated work"

[kind.params]
type = "object"
required = ["duration_ms", "steps"]

[kind.params.properties.duration_ms]
type = "integer"
minimum = 1
maximum = 86400000
default = 10000
title = "Duration (ms)"

[kind.params.properties.steps]
type = "integer"
minimum = 1
maximum = 1000000000
default = 100
title = "Steps"

[kind.params.properties.fail_at]
type = "integer"
minimum = 0
maximum = 1000000000
title = "Fail at step (optional)"

[[kind]]
name = "count"
backend = "jobs"
title = "Count"
params = { type = "object", required = ["n"], properties = { n = { type = "integer", minimum = 1, maximum = 100, default = 5, title = "How many", description = "The job counts to this, over 2 s." } } }
`,
  );
  return file;
}

let jobs: { server: Server; starts: unknown[] } | null = null;
let server: OwnServer | null = null;

test.beforeAll(async () => {
  jobs = jobService();
  const jobsPort = await freePort();
  await new Promise<void>((resolve) => jobs!.server.listen(jobsPort, '127.0.0.1', resolve));
  server = new OwnServer(await freePort(), ['--config', configFile(jobsPort)]);
  await server.start();
});

test.afterAll(async () => {
  await server?.stop();
  await new Promise((resolve) => jobs?.server.close(resolve));
});

test('GET /api/kinds lists the configured kinds, and the page carries the same', async () => {
  const res = await fetch(`${server!.url}/api/kinds`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/application\/json/);
  const kinds = await res.json();
  expect(kinds.map((k: { name: string }) => k.name)).toEqual(['simulate', 'count']);
  expect(kinds[1].title).toBe('Count');
  // The schema's properties keep the file's order (the form's order).
  expect(Object.keys(kinds[0].params.properties)).toEqual(['duration_ms', 'steps', 'fail_at']);
  expect(kinds[1].params.properties.n).toMatchObject({ minimum: 1, maximum: 100, default: 5 });

  // Server-rendered, before any JS: the selector with both titles, the first
  // kind's fields, and the kinds as JSON for hydration.
  const html = await (await fetch(`${server!.url}/`)).text();
  expect(html).toMatch(/<select[^>]*id="kind"/);
  expect(html).toContain('>Simulated work</option>');
  expect(html).toContain('>Count</option>');
  expect(html).toMatch(/<input[^>]*name="duration_ms"/);
  expect(html).not.toMatch(/<input[^>]*name="n"/);
  expect(html).not.toMatch(/\sstyle=/);
  const data = html.match(/<script id="tw-kinds" type="application\/json">(.*?)<\/script>/s);
  expect(data, 'script#tw-kinds in the page').not.toBeNull();
  expect(JSON.parse(data![1])).toEqual(kinds);
});

test('one task of each kind, from the page, both to 100 %', async ({ page }) => {
  await installAxe(page);
  await openApp(page, server!.url);
  const form = page.locator('form#start-form');
  const kind = page.locator('select#kind');
  await expect(page.getByLabel('Kind')).toHaveCount(1);
  await expect(kind.locator('option')).toHaveText(['Simulated work', 'Count']);

  // The simulate kind first: its fields, from its schema, with its defaults.
  await expect(form.locator('input[name="duration_ms"]')).toHaveValue('10000');
  await expect(form.locator('input[name="steps"]')).toHaveValue('100');
  await expect(form.locator('input[name="n"]')).toHaveCount(0);
  await form.locator('input[name="duration_ms"]').fill('1500');
  await form.locator('input[name="steps"]').fill('10');
  const [sim] = await expectNewTasks(page, 1, () => form.locator('button[type="submit"]').click());

  // Count: one field, labelled by its title, described, limited, defaulted.
  await kind.selectOption({ label: 'Count' });
  const n = form.locator('input[name="n"]');
  await expect(n).toHaveValue('5');
  await expect(n).toHaveAttribute('type', 'number');
  await expect(n).toHaveAttribute('min', '1');
  await expect(n).toHaveAttribute('max', '100');
  await expect(page.getByLabel('How many')).toHaveCount(1);
  await expect(n).toHaveAttribute('aria-describedby', 'help-n err-n');
  await expect(page.locator('#help-n')).toHaveText('The job counts to this, over 2 s.');
  await expect(form.locator('input[name="duration_ms"]')).toHaveCount(0);
  await expectNoAxeViolations(page, 'the Count form');

  // Checked in the browser: nothing is sent.
  await n.fill('0');
  await form.locator('button[type="submit"]').click();
  await expect(page.locator('#err-n')).toHaveText('How many must be from 1 to 100');
  await expect(n).toHaveAttribute('aria-invalid', 'true');
  await expect(n).toBeFocused();
  // At the field only, not repeated under the form.
  await expect(page.locator('#start-error')).toHaveText('');
  await n.fill('2.5');
  await form.locator('button[type="submit"]').click();
  await expect(page.locator('#err-n')).toHaveText('How many must be a whole number');
  expect(jobs!.starts).toEqual([]);

  // Refused by the service: shown at the field the message names.
  await n.fill('13');
  await form.locator('button[type="submit"]').click();
  await expect(page.locator('#err-n')).toHaveText('13 is an unlucky number');
  await expect(n).toHaveAttribute('aria-invalid', 'true');
  await expect(page.locator('#start-error')).toHaveText('');

  await n.fill('4');
  const [count] = await expectNewTasks(page, 1, () => form.locator('button[type="submit"]').click());
  await expect(page.locator('#err-n')).toHaveText('');
  await expect(n).not.toHaveAttribute('aria-invalid', 'true');
  expect(jobs!.starts).toContainEqual({ type: 'count', input: { n: 4 } });

  // The cards say which kind (its title) and the backend's message.
  await expect(taskItem(page, count).locator('.kind')).toHaveText('Count');
  await expect(taskItem(page, count).locator('.kind')).toHaveAttribute('data-kind', 'count');
  await expect(taskItem(page, sim).locator('.kind')).toHaveText('Simulated work');
  for (const id of [sim, count]) {
    const task = taskItem(page, id);
    await expect(task).toHaveAttribute('data-state', 'succeeded', { timeout: 20_000 });
    await expect(progressBar(task)).toHaveAttribute('aria-valuenow', '100');
  }
  await expect(taskItem(page, count).locator('.message')).toHaveText('counted 4 of 4');
  await expect(taskItem(page, count).locator('.count')).toHaveText(/^\s*4\s*\/\s*4\s*$/);
  await expect(taskItem(page, sim).locator('.count')).toHaveText(/^\s*10\s*\/\s*10\s*$/);

  // Back to simulate: its fields kept what they had.
  await kind.selectOption({ label: 'Simulated work' });
  await expect(form.locator('input[name="duration_ms"]')).toHaveValue('1500');
});
