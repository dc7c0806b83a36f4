// Summarise a cache-tests (https://cache-tests.fyi) results JSON the way cache-tests.fyi
// shows it: one line per result type, per test kind, then every test that is not a pass
// or a "check" answer. Run from the http-cache-tests package directory:
//   node --no-warnings summary.mjs RESULTS.json
import fs from 'fs'
import path from 'path'
import { pathToFileURL } from 'url'

const pkg = process.env.CACHE_TESTS_SUITE || process.cwd()
const load = rel => import(pathToFileURL(path.join(pkg, rel)).href)
const tests = (await load('tests/index.mjs')).default
tests.push((await load('tests/surrogate-control.mjs')).default)
const display = await load('lib/display.mjs')

const results = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'))
const names = { '✅': 'pass', '⛔️': 'fail', '⚠️': 'optional_fail', Y: 'check_yes', N: 'check_no',
  '🔹': 'setup_fail', '⁉️': 'harness_fail', '⚪️': 'dependency_fail', '↻': 'retry', '-': 'untested' }
const byType = {}
const byKind = {}
const notPassed = []
for (const suite of tests) {
  for (const test of suite.tests) {
    if (!(test.id in results)) continue
    const symbol = display.determineTestResult(tests, test.id, results)[2]
    const type = names[symbol] || symbol
    const kind = test.kind || 'required'
    byType[type] = (byType[type] || 0) + 1
    byKind[kind] = byKind[kind] || {}
    byKind[kind][type] = (byKind[kind][type] || 0) + 1
    if (type !== 'pass' && type !== 'check_yes' && type !== 'check_no') {
      const detail = Array.isArray(results[test.id]) ? results[test.id][1] : ''
      notPassed.push(`${type.padEnd(15)} ${kind.padEnd(8)} ${test.id}  ${detail || ''}`)
    }
  }
}
const total = Object.values(byType).reduce((a, b) => a + b, 0)
console.log(`total ${total}: ` + Object.entries(byType).map(([k, v]) => `${k}=${v}`).join(' '))
for (const [kind, counts] of Object.entries(byKind)) {
  console.log(`  ${kind}: ` + Object.entries(counts).map(([k, v]) => `${k}=${v}`).join(' '))
}
for (const line of notPassed) console.log(line)
