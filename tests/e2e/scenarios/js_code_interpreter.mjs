// @e2b/code-interpreter (JS, from npm) against code-interpreter-v1: state, streaming callbacks,
// a chart, a javascript context, an error, envs, kill. Prints "ok" last; throws at the first failure.
import assert from 'node:assert/strict'
import { Sandbox } from '@e2b/code-interpreter'

const sbx = await Sandbox.create({ timeoutMs: 300_000 })
try {
  await sbx.runCode('x = 41')
  assert.equal((await sbx.runCode('x + 1')).text, '42')

  const lines = []
  const printed = await sbx.runCode("print('a'); print('b')", { onStdout: (m) => lines.push(m.line) })
  assert.equal(lines.join(''), 'a\nb\n') // the kernel may batch both lines into one message
  assert.deepEqual(printed.logs.stdout, lines)

  const chart = await sbx.runCode("import matplotlib.pyplot as plt\nplt.pie([1, 2], labels=['p', 'q'])\nplt.show()")
  assert.ok(chart.results[0].png)
  assert.equal(chart.results[0].chart.type, 'pie')
  assert.deepEqual(chart.results[0].chart.elements.map((e) => e.label), ['p', 'q'])

  const ctx = await sbx.createCodeContext({ language: 'javascript', cwd: '/tmp' })
  assert.equal(ctx.cwd, '/tmp')
  assert.deepEqual((await sbx.runCode('console.log(Deno.cwd())', { context: ctx })).logs.stdout, ['/tmp\n'])

  const failed = await sbx.runCode("raise KeyError('k')")
  assert.equal(failed.error.name, 'KeyError')

  const env = await sbx.runCode("import os; os.environ['JS_ENV']", { envs: { JS_ENV: 'from js' } })
  assert.equal(env.text, 'from js')
  console.log('ok')
} finally {
  await sbx.kill()
}
