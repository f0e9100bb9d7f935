// Markdown to DOM for model output, safely: every piece of text becomes a text node, never HTML.
// Covers what chat answers use (paragraphs, headings, lists, quotes, fenced code, tables, rules,
// `code`, **bold**, *italic*, ~~strike~~, links); links open only for http(s) and mailto URLs.
// It renders unfinished input too (an open code fence runs to the end), as a stream arrives. As in
// CommonMark, the rest of a fence's opening line is its info string (the first word names the
// language), not text.
"use strict";

(function () {
  const INLINE = new RegExp([
    "(`+)([\\s\\S]*?[^`])\\1(?!`)",                       // 1,2: code span
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",                  // 3: bold
    "__(?=\\S)([\\s\\S]*?\\S)__",                          // 4: bold
    "~~(?=\\S)([\\s\\S]*?\\S)~~",                          // 5: strike
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",                // 6: italic
    "\\[([^\\]\\n]+)\\]\\(([^)\\s]+)\\)",                  // 7,8: link
    "(https?:\\/\\/[^\\s<>()]*[^\\s<>().,;:!?'\"])",      // 9: bare URL
  ].join("|"), "g");

  function el(tag, children) {
    const node = document.createElement(tag);
    for (const c of children || []) node.append(c);
    return node;
  }

  function safeUrl(href) {
    try {
      const url = new URL(href, window.location.href);
      return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  // A link to `href` showing `text` (its inline markup too, unless it is the bare URL itself).
  function link(text, href) {
    const url = safeUrl(href);
    if (!url) return document.createTextNode(text === href ? text : `${text} (${href})`);
    const a = el("a", text === href ? [document.createTextNode(text)] : inline(text));
    a.href = url;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    return a;
  }

  // Inline markup of one block's text, as a list of nodes.
  function inline(text) {
    const out = [];
    let last = 0;
    const re = new RegExp(INLINE.source, "g");
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
      if (m[1] !== undefined) out.push(el("code", [document.createTextNode(m[2])]));
      else if (m[3] !== undefined || m[4] !== undefined) out.push(el("strong", inline(m[3] ?? m[4])));
      else if (m[5] !== undefined) out.push(el("del", inline(m[5])));
      else if (m[6] !== undefined) out.push(el("em", inline(m[6])));
      else if (m[7] !== undefined) out.push(link(m[7], m[8]));
      else out.push(link(m[9], m[9]));
      last = re.lastIndex;
    }
    if (last < text.length) out.push(document.createTextNode(text.slice(last)));
    return out;
  }

  const FENCE = /^\s{0,3}(```+|~~~+)\s*([\w+-]*)/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;

  function cells(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|")) s = s.slice(0, -1);
    return s.split("|").map((c) => c.trim());
  }

  function startsBlock(line, next) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line) ||
      (line.includes("|") && next !== undefined && TABLE_SEP.test(next));
  }

  // Block structure of `text` as a DocumentFragment.
  function render(text) {
    const frag = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) {
        const closing = new RegExp(`^\\s{0,3}${m[1][0]}{${m[1].length},}\\s*$`);  // as long, nothing after
        const body = [];
        i++;
        while (i < lines.length && !closing.test(lines[i])) body.push(lines[i++]);
        i++;
        const code = el("code", [document.createTextNode(body.join("\n"))]);
        if (m[2]) code.className = "language-" + m[2];
        frag.append(el("pre", [code]));
      } else if ((m = HEADING.exec(line))) {
        frag.append(el("h" + m[1].length, inline(m[2])));
        i++;
      } else if (RULE.test(line)) {
        frag.append(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
        frag.append(el("blockquote", [render(body.join("\n"))]));
      } else if ((m = ITEM.exec(line))) {
        const ordered = /\d/.test(m[2]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered && parseInt(m[2], 10) !== 1) list.start = parseInt(m[2], 10);
        let item = null;
        while (i < lines.length) {
          const im = ITEM.exec(lines[i]);
          if (im && /\d/.test(im[2]) === ordered) {
            item = el("li", inline(im[3]));
            list.append(item);
          } else if (item && lines[i].trim() && /^\s/.test(lines[i]) && !startsBlock(lines[i].trim())) {
            item.append(document.createTextNode("\n"), ...inline(lines[i].trim()));  // a continued item
          } else if (item && im) {
            item.append(render(lines[i]));  // a nested list of the other kind
          } else break;
          i++;
        }
        frag.append(list);
      } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        const table = el("table");
        table.append(el("thead", [el("tr", cells(line).map((c) => el("th", inline(c))))]));
        const body = el("tbody");
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
          body.append(el("tr", cells(lines[i]).map((c) => el("td", inline(c)))));
          i++;
        }
        table.append(body);
        frag.append(table);
      } else {
        const para = [line];
        i++;
        while (i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1])) para.push(lines[i++]);
        frag.append(el("p", inline(para.join("\n"))));
      }
    }
    return frag;
  }

  window.renderMarkdown = render;
})();
