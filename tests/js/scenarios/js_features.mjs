// The JS SDK (e2b from npm) against a plain-HTTP sandboxd through E2B_API_URL/E2B_SANDBOX_URL:
// what the release matrix's scenario does not cover — background commands reconnected by pid,
// PTY, files watch, signed upload/download URLs, metrics, Template.build and a sandbox of the
// built template, pause and resume. Run from the release's npm dir; one line per step; exits
// non-zero at the first failure. argv[2]: the alias to build.
import { readFileSync } from 'node:fs'
import { Sandbox, Template, FilesystemEventType } from 'e2b'

const VERSION = JSON.parse(readFileSync(new URL('./node_modules/e2b/package.json', import.meta.url))).version
const ALIAS = process.argv[2]
const step = (name) => console.log(`[e2b JS ${VERSION}] ${name}`)
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`)
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function main() {
  step('create (secure: signed URLs need the access token)')
  const sbx = await Sandbox.create('base', { timeoutMs: 180_000, secure: true })
  try {
    step('commands: streaming, background, reconnect by pid')
    const out = []
    const r = await sbx.commands.run('for i in 1 2 3; do echo line$i; sleep 0.1; done', { onStdout: (d) => out.push(d) })
    check(r.exitCode === 0 && out.join('') === 'line1\nline2\nline3\n', JSON.stringify([r, out]))
    const bg = await sbx.commands.run('sleep 1; echo from-background', { background: true })
    const again = await sbx.commands.connect(bg.pid)
    const done = await again.wait()
    check(done.stdout.includes('from-background'), `reconnected output ${JSON.stringify(done)}`)

    step('pty')
    const chunks = []
    const term = await sbx.pty.create({ cols: 100, rows: 30, onData: (d) => chunks.push(Buffer.from(d)) })
    await sbx.pty.sendInput(term.pid, new TextEncoder().encode('echo pty-$((6*7)); tput cols\nexit\n'))
    await term.wait()
    const text = Buffer.concat(chunks).toString()
    check(text.includes('pty-42') && text.includes('100'), `pty output ${JSON.stringify(text)}`)

    step('files: watch')
    const events = []
    await sbx.files.makeDir('/home/user/watched')
    const watcher = await sbx.files.watchDir('/home/user/watched', (e) => events.push(e))
    await sbx.files.write('/home/user/watched/new.txt', 'hello')
    for (let i = 0; i < 50 && !events.some((e) => e.name === 'new.txt'); i++) await sleep(100)
    await watcher.stop()
    check(events.some((e) => e.name === 'new.txt' && [FilesystemEventType.CREATE, FilesystemEventType.WRITE].includes(e.type)),
      `watch events ${JSON.stringify(events)}`)

    step('files: signed upload and download URLs')
    const up = await sbx.uploadUrl('/home/user/signed.txt', { useSignatureExpiration: 120 })
    const form = new FormData()
    form.append('file', new Blob(['signed bytes']), 'signed.txt')
    const posted = await fetch(up, { method: 'POST', body: form })
    check(posted.ok, `upload answered ${posted.status}`)
    const down = await sbx.downloadUrl('/home/user/signed.txt', { useSignatureExpiration: 120 })
    const got = await fetch(down)
    check(got.ok && (await got.text()) === 'signed bytes', `download answered ${got.status}`)
    const tampered = await fetch(down.replace(/signature=([^&]+)/, 'signature=v1_bad'))
    check(tampered.status === 401, `a bad signature answered ${tampered.status}`)

    step('metrics')
    let metrics = []
    for (let i = 0; i < 20 && !metrics.length; i++) {
      metrics = await sbx.getMetrics()
      if (!metrics.length) await sleep(500)
    }
    check(metrics.length && metrics[0].memTotal > 0 && metrics[0].cpuCount >= 1, `metrics ${JSON.stringify(metrics)}`)

    step('pause and resume')
    await sbx.files.write('/home/user/kept.txt', 'kept')
    await sbx.pause()
    const resumed = await Sandbox.connect(sbx.sandboxId)
    check((await resumed.files.read('/home/user/kept.txt')) === 'kept', 'files kept over pause')
  } finally {
    await sbx.kill()
  }

  step(`Template.build ${ALIAS}`)
  const logs = []
  await Template.build(Template().fromTemplate('base').runCmd('echo built-by-js > /home/user/js.txt'), ALIAS, {
    cpuCount: 1, memoryMB: 512, onBuildLogs: (l) => logs.push(l.message),
  })
  check(logs.length > 0, 'build logs streamed')
  const child = await Sandbox.create(ALIAS, { timeoutMs: 60_000 })
  try {
    check((await child.files.read('/home/user/js.txt')) === 'built-by-js\n', 'the built file is there')
    check((await child.getInfo()).name === ALIAS || (await child.getInfo()).templateId, 'its info')
  } finally {
    await child.kill()
  }
  step('ok')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
