// sandboxd's web console: the REST API (X-API-Key) for sandboxes, logs and templates, and envd's
// PTY API (Connect RPC over the same listener, routed by E2b-Sandbox-Id) for the terminal.
'use strict'

const ENVD_PORT = '49983'
const $ = (sel) => document.querySelector(sel)
let apiKey = sessionStorage.getItem('sandboxd-api-key') || ''
let logsFor = null
let refreshTimer = null
let logsTimer = null
let terminal = null

// -- API ------------------------------------------------------------------------------------------

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { 'X-API-Key': apiKey, ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}) },
    body: body !== undefined ? JSON.stringify(body) : undefined,
  })
  if (!res.ok) {
    let message = res.statusText
    try { message = (await res.json()).message || message } catch (_) { /* not JSON */ }
    const err = new Error(`${method} ${path}: ${res.status} ${message}`)
    err.status = res.status
    throw err
  }
  return res.status === 204 ? null : res.json()
}

async function listAll(path) {
  // every page of a list the API pages with x-next-token
  const out = []
  let token = null
  do {
    const res = await fetch(token ? `${path}&nextToken=${encodeURIComponent(token)}` : path, { headers: { 'X-API-Key': apiKey } })
    if (!res.ok) throw Object.assign(new Error(`GET ${path}: ${res.status}`), { status: res.status })
    out.push(...await res.json())
    token = res.headers.get('x-next-token')
  } while (token)
  return out
}

function showError(err) {
  const p = $('#error')
  p.textContent = err ? String(err.message || err) : ''
  p.hidden = !err
}

// -- login ----------------------------------------------------------------------------------------

async function login(key) {
  apiKey = key
  await api('GET', '/v2/sandboxes?limit=1')  // 401 on a wrong key
  sessionStorage.setItem('sandboxd-api-key', key)
  $('#login').hidden = true
  $('#app').hidden = false
  $('#tabs').hidden = false
  refresh()
  refreshTimer = setInterval(refresh, 2000)
}

$('#login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault()
  const err = $('#login-error')
  err.hidden = true
  try {
    await login($('#api-key').value.trim())
  } catch (e) {
    err.textContent = e.status === 401 ? 'That API key is not valid.' : String(e.message)
    err.hidden = false
  }
})

$('#logout').addEventListener('click', () => {
  sessionStorage.removeItem('sandboxd-api-key')
  location.reload()
})

document.querySelectorAll('#tabs button[data-tab]').forEach((b) => b.addEventListener('click', () => {
  document.querySelectorAll('#tabs button[data-tab]').forEach((o) => o.classList.toggle('active', o === b))
  document.querySelectorAll('.tab').forEach((t) => { t.hidden = t.id !== `${b.dataset.tab}-tab` })
  if (b.dataset.tab === 'templates') loadTemplates().catch(showError)
}))

// -- sandboxes ------------------------------------------------------------------------------------

function age(iso) {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000))
  return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${Math.floor(s / 3600)}h ${Math.floor(s / 60) % 60}m`
}
const mib = (bytes) => `${Math.round(bytes / 1048576)} MiB`

async function refresh() {
  try {
    const sandboxes = await listAll('/v2/sandboxes?state=running,paused&limit=100')
    const running = sandboxes.filter((s) => s.state === 'running').map((s) => s.sandboxID)
    const metrics = {}
    for (let i = 0; i < running.length; i += 100) {  // the API takes up to 100 ids per call
      Object.assign(metrics, (await api('GET', `/sandboxes/metrics?sandbox_ids=${running.slice(i, i + 100).join(',')}`)).sandboxes)
    }
    renderSandboxes(sandboxes, metrics)
    showError(null)
  } catch (e) {
    showError(e)
  }
}

function button(label, action, onClick) {
  const b = document.createElement('button')
  b.textContent = label
  b.dataset.action = action
  b.addEventListener('click', onClick)
  return b
}

function renderSandboxes(sandboxes, metrics) {
  const body = $('#sandboxes tbody')
  const typing = document.activeElement && document.activeElement.tagName === 'INPUT' ? document.activeElement.closest('tr') : null
  $('#no-sandboxes').hidden = sandboxes.length > 0
  const seen = new Set()
  for (const s of sandboxes) {
    seen.add(s.sandboxID)
    let tr = body.querySelector(`tr[data-id="${s.sandboxID}"]`)
    if (!tr) {
      tr = document.createElement('tr')
      tr.dataset.id = s.sandboxID
      for (const cls of ['id', 'template', 'state', 'age', 'cpu', 'memory', 'ends', 'actions']) {
        const td = document.createElement('td')
        td.className = cls
        tr.appendChild(td)
      }
      tr.querySelector('.id').textContent = s.sandboxID
      const actions = tr.querySelector('.actions')
      actions.append(
        button('Logs', 'logs', () => openLogs(s.sandboxID)),
        button('Terminal', 'terminal', () => openTerminal(s.sandboxID).catch(showError)),
        button('Pause', 'pause', () => act(() => api('POST', `/sandboxes/${s.sandboxID}/pause`, {}))),
        button('Resume', 'resume', () => act(() => api('POST', `/v2/sandboxes/${s.sandboxID}/connect`, {}))),
      )
      const timeout = document.createElement('input')
      timeout.type = 'number'
      timeout.min = '1'
      timeout.placeholder = 'seconds'
      timeout.dataset.field = 'timeout'
      actions.append(timeout, button('Set timeout', 'timeout', () => act(() =>
        api('POST', `/sandboxes/${s.sandboxID}/timeout`, { timeout: Number(timeout.value) }))))
      actions.append(button('Kill', 'kill', () => act(() => api('DELETE', `/sandboxes/${s.sandboxID}`))))
      body.appendChild(tr)
    }
    tr.querySelector('.template').textContent = s.alias || s.templateID
    const state = tr.querySelector('.state')
    state.textContent = s.state
    state.className = `state state-${s.state}`
    tr.querySelector('.age').textContent = age(s.startedAt)
    const m = metrics[s.sandboxID]
    tr.querySelector('.cpu').textContent = m ? `${m.cpuUsedPct.toFixed(1)}% of ${m.cpuCount}` : `${s.cpuCount} CPUs`
    tr.querySelector('.memory').textContent = m ? `${mib(m.memUsed)} / ${mib(m.memTotal)}` : `${s.memoryMB} MiB`
    tr.querySelector('.ends').textContent = s.state === 'running' ? age(new Date(2 * Date.now() - Date.parse(s.endAt)).toISOString()) : ''
    tr.querySelector('[data-action=pause]').hidden = s.state !== 'running'
    tr.querySelector('[data-action=resume]').hidden = s.state !== 'paused'
    tr.querySelector('[data-action=terminal]').disabled = s.state !== 'running'
    tr.classList.toggle('selected', s.sandboxID === logsFor)
  }
  for (const tr of [...body.querySelectorAll('tr')]) {
    if (!seen.has(tr.dataset.id) && tr !== typing) tr.remove()  // not under the user's cursor
  }
  if (terminal && !terminal.gone && !seen.has(terminal.sandboxId)) {
    terminal.gone = true
    terminal.term.write('\r\n[the sandbox is gone]\r\n')
  }
}

async function act(fn) {
  try {
    await fn()
    await refresh()
  } catch (e) {
    showError(e)
  }
}

// -- logs -----------------------------------------------------------------------------------------

function openLogs(sandboxId) {
  logsFor = sandboxId
  $('#logs-panel').hidden = false
  $('#logs-panel .target').textContent = sandboxId
  $('#logs').textContent = ''
  clearInterval(logsTimer)
  pollLogs()
  logsTimer = setInterval(pollLogs, 1000)
}

async function pollLogs() {
  const id = logsFor
  try {
    const { logs } = await api('GET', `/v2/sandboxes/${id}/logs?direction=forward`)
    if (id !== logsFor) return
    const pre = $('#logs')
    if (pre.childElementCount === logs.length) return
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4
    pre.replaceChildren(...logs.map((e) => {
      const line = document.createElement('div')
      line.className = `level-${e.level}`
      line.textContent = `${e.timestamp.slice(11, 23)} ${e.level.padEnd(5)} ${e.message}`
      return line
    }))
    if (atBottom) pre.scrollTop = pre.scrollHeight
  } catch (e) {
    if (e.status === 404) $('#logs').textContent = 'No logs.'
    else showError(e)
  }
}

// -- terminal (envd's PTY over Connect RPC) --------------------------------------------------------

function envelope(message) {
  const payload = new TextEncoder().encode(JSON.stringify(message))
  const out = new Uint8Array(5 + payload.length)
  new DataView(out.buffer).setUint32(1, payload.length)
  out.set(payload, 5)
  return out
}

const b64encode = (bytes) => btoa(String.fromCharCode(...bytes))
const b64decode = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0))

function envdHeaders(sandboxId, token) {
  return {
    'E2b-Sandbox-Id': sandboxId, 'E2b-Sandbox-Port': ENVD_PORT, 'Connect-Protocol-Version': '1',
    'Authorization': `Basic ${btoa('user:')}`, ...(token ? { 'X-Access-Token': token } : {}),
  }
}

async function envdUnary(sandboxId, token, method, message) {
  const res = await fetch(`/process.Process/${method}`, {
    method: 'POST', headers: { ...envdHeaders(sandboxId, token), 'Content-Type': 'application/json' },
    body: JSON.stringify(message),
  })
  if (!res.ok) throw new Error(`envd ${method}: ${res.status} ${await res.text()}`)
}

async function openTerminal(sandboxId) {
  closeTerminal()
  const detail = await api('GET', `/sandboxes/${sandboxId}`)
  const token = detail.envdAccessToken
  $('#terminal-panel').hidden = false
  $('#terminal-panel .target').textContent = sandboxId
  const term = new Terminal({ cursorBlink: true, fontSize: 13, convertEol: false })
  const fit = new FitAddon.FitAddon()
  term.loadAddon(fit)
  term.open($('#terminal'))
  fit.fit()
  const abort = new AbortController()
  const session = { term, abort, pid: null, sandboxId }
  terminal = session
  const res = await fetch('/process.Process/Start', {
    method: 'POST', signal: abort.signal,
    headers: { ...envdHeaders(sandboxId, token), 'Content-Type': 'application/connect+json' },
    body: envelope({
      process: { cmd: '/bin/bash', args: ['-i', '-l'], envs: { TERM: 'xterm-256color' }, cwd: '/home/user' },
      pty: { size: { cols: term.cols, rows: term.rows } },
    }),
  })
  if (!res.ok) throw new Error(`envd Start: ${res.status} ${await res.text()}`)
  // keystrokes go out one SendInput at a time, in order (concurrent calls could overtake each other)
  session.pending = ''
  session.sending = false
  const flush = async () => {
    if (session.sending) return
    session.sending = true
    try {
      while (session.pending && session.pid !== null) {
        const data = session.pending
        session.pending = ''
        await envdUnary(sandboxId, token, 'SendInput',
          { process: { pid: session.pid }, input: { pty: b64encode(new TextEncoder().encode(data)) } })
      }
    } catch (e) {
      showError(e)
    } finally {
      session.sending = false
    }
  }
  session.flush = flush
  term.onData((data) => {
    session.pending += data
    flush()
  })
  term.onResize(({ cols, rows }) => {
    if (session.pid !== null) envdUnary(sandboxId, token, 'Update', { process: { pid: session.pid }, pty: { size: { cols, rows } } }).catch(() => {})
  })
  term.focus()
  readStream(res.body.getReader(), session).catch((e) => { if (!abort.signal.aborted) showError(e) })
}

async function readStream(reader, session) {
  let buf = new Uint8Array(0)
  for (;;) {
    const { value, done } = await reader.read()
    if (done) break
    const joined = new Uint8Array(buf.length + value.length)
    joined.set(buf)
    joined.set(value, buf.length)
    buf = joined
    while (buf.length >= 5) {
      const flags = buf[0]
      const size = new DataView(buf.buffer, buf.byteOffset).getUint32(1)
      if (buf.length < 5 + size) break
      const msg = JSON.parse(new TextDecoder().decode(buf.subarray(5, 5 + size)) || '{}')
      buf = buf.slice(5 + size)
      if (flags & 2) {
        if (msg.error) session.term.write(`\r\n[envd: ${msg.error.message || msg.error.code}]\r\n`)
        return
      }
      const ev = msg.event || {}
      if (ev.start) {
        session.pid = ev.start.pid
        session.flush()  // anything typed before the shell started
      }
      if (ev.data && ev.data.pty) session.term.write(b64decode(ev.data.pty))
      if (ev.end) session.term.write('\r\n[session ended]\r\n')
    }
  }
}

function closeTerminal() {
  if (!terminal) return
  terminal.abort.abort()
  terminal.term.dispose()
  terminal = null
  $('#terminal-panel').hidden = true
}
$('#terminal-close').addEventListener('click', closeTerminal)

// -- templates ------------------------------------------------------------------------------------

async function loadTemplates() {
  const templates = await api('GET', '/templates')
  const body = $('#templates tbody')
  body.replaceChildren(...templates.map((t) => {
    const tr = document.createElement('tr')
    tr.dataset.id = t.templateID
    for (const v of [t.aliases.join(', '), t.templateID, t.buildStatus, t.cpuCount, `${t.memoryMB} MiB`, t.buildCount,
      new Date(t.updatedAt).toLocaleString()]) {
      const td = document.createElement('td')
      td.textContent = String(v)
      tr.appendChild(td)
    }
    tr.addEventListener('click', () => loadBuilds(t.templateID, t.aliases[0]).catch(showError))
    return tr
  }))
}

async function loadBuilds(templateId, name) {
  const t = await api('GET', `/templates/${templateId}`)
  $('#builds-panel').hidden = false
  $('#builds-panel .target').textContent = name
  $('#build-logs').textContent = t.builds.length ? 'Choose a build.' : 'No builds through the API (built by the server itself).'
  $('#builds tbody').replaceChildren(...t.builds.map((b) => {
    const tr = document.createElement('tr')
    tr.dataset.id = b.buildID
    for (const v of [b.buildID, b.status, new Date(b.createdAt).toLocaleString(), b.finishedAt ? new Date(b.finishedAt).toLocaleString() : '']) {
      const td = document.createElement('td')
      td.textContent = v
      tr.appendChild(td)
    }
    tr.addEventListener('click', () => loadBuildLogs(templateId, b.buildID).catch(showError))
    return tr
  }))
}

async function loadBuildLogs(templateId, buildId) {
  const lines = []
  for (let offset = 0; ; offset += 100) {
    const status = await api('GET', `/templates/${templateId}/builds/${buildId}/status?logsOffset=${offset}&limit=100`)
    lines.push(...status.logEntries.map((e) => `${e.timestamp.slice(11, 23)} ${e.level.padEnd(5)} ${e.message}`))
    if (status.logEntries.length < 100) {
      if (status.reason) lines.push(`error: ${status.reason.message}`)
      break
    }
  }
  $('#build-logs').textContent = lines.join('\n')
}

if (apiKey) login(apiKey).catch(() => sessionStorage.removeItem('sandboxd-api-key'))
