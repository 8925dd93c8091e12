// One scenario for every released JS `e2b` in the matrix, run from that release's own npm dir
// (the test copies this file there): create, commands with streaming, background + stdin, files,
// pty, list, timeout, kill, and pause/resume. Only the public API of the release it runs under.
// Prints one line per step; exits non-zero at the first failure.
import { readFileSync } from 'node:fs'
import { Sandbox, CommandExitError } from 'e2b'

const VERSION = JSON.parse(readFileSync(new URL('./node_modules/e2b/package.json', import.meta.url))).version
const step = (name) => console.log(`[e2b JS ${VERSION}] ${name}`)
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`)
}

async function listedIds() {
  const ids = new Set()
  const paginator = Sandbox.list()
  while (paginator.hasNext) for (const s of await paginator.nextItems()) ids.add(s.sandboxId)
  return ids
}

async function main() {
  step('create')
  const sbx = await Sandbox.create('base', { timeoutMs: 120_000 })
  try {
    check(sbx.getHost(8080) === `8080-${sbx.sandboxId}.${process.env.E2B_DOMAIN}`, `host ${sbx.getHost(8080)}`)

    step('commands: streaming stdout and stderr, exit codes')
    const out = []
    const err = []
    const r = await sbx.commands.run('for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.1; done', {
      onStdout: (d) => out.push(d),
      onStderr: (d) => err.push(d),
    })
    check(r.exitCode === 0 && r.stdout === 'out1\nout2\nout3\n', JSON.stringify(r))
    check(out.join('') === r.stdout && err.join('') === 'err1\nerr2\nerr3\n', JSON.stringify([out, err]))
    let raised = false
    try {
      await sbx.commands.run('exit 3')
    } catch (e) {
      raised = e instanceof CommandExitError && e.exitCode === 3
    }
    check(raised, 'exit 3 raises CommandExitError(3)')
    check((await sbx.commands.run('whoami')).stdout === 'user\n', 'default user')

    step('commands: background, stdin, kill')
    const h = await sbx.commands.run('read line; echo got:$line', { background: true, stdin: true })
    await sbx.commands.sendStdin(h.pid, 'hello\n')
    check((await h.wait()).stdout === 'got:hello\n', 'stdin reached the command')
    const sleeper = await sbx.commands.run('sleep 600', { background: true })
    check((await sbx.commands.kill(sleeper.pid)) === true, 'kill')

    step('files: write, read, list, exists, remove')
    await sbx.files.write('/home/user/matrix.txt', 'from the matrix')
    check((await sbx.files.read('/home/user/matrix.txt')) === 'from the matrix', 'read back')
    check((await sbx.files.list('/home/user')).some((e) => e.name === 'matrix.txt'), 'listed')
    check(await sbx.files.exists('/home/user/matrix.txt'), 'exists')
    await sbx.files.remove('/home/user/matrix.txt')
    check(!(await sbx.files.exists('/home/user/matrix.txt')), 'removed')

    step('pty')
    const chunks = []
    const term = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => chunks.push(Buffer.from(d)) })
    await sbx.pty.sendInput(term.pid, new TextEncoder().encode('echo pty-$((6*7))\nexit\n'))
    await term.wait()
    check(Buffer.concat(chunks).toString().includes('pty-42'), 'pty output')

    step('list')
    check((await listedIds()).has(sbx.sandboxId), 'listed')

    step('pause and resume (connect)')
    await sbx.files.write('/home/user/kept.txt', 'kept')
    await (typeof sbx.pause === 'function' ? sbx.pause() : sbx.betaPause())
    const again = await Sandbox.connect(sbx.sandboxId)
    check((await again.files.read('/home/user/kept.txt')) === 'kept', 'files kept over pause')
    check((await again.commands.run('echo resumed')).stdout === 'resumed\n', 'runs after resume')

    step('timeout')
    const short = await Sandbox.create('base', { timeoutMs: 60_000 })
    await short.setTimeout(2_000)
    const deadline = Date.now() + 30_000
    while (await short.isRunning()) {
      check(Date.now() < deadline, 'the sandbox outlived its timeout')
      await new Promise((r) => setTimeout(r, 500))
    }
    check(!(await listedIds()).has(short.sandboxId), 'timed-out sandbox not listed')
  } finally {
    step('kill')
    await sbx.kill()
  }
  check(!(await listedIds()).has(sbx.sandboxId), 'killed sandbox not listed')
  step('ok')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
