// A small, safe Markdown subset for the researcher's guidelines: headings (#, ##, ###),
// paragraphs, bullet (-, *) and numbered (1.) lists, **bold**, *italics* / _italics_ and
// `code`. Everything else is text: the page builds elements and sets textContent, it never
// parses HTML, so a guideline cannot add markup, links or script.
"use strict";

// _italics_ only between word boundaries, so snake_case and __names__ stay as they are
const INLINE = /(\*\*[^*\n]+\*\*|`[^`\n]+`|\*[^*\s][^*\n]*\*|(?<!\w)_[^_\s][^_\n]*_(?!\w))/;

function inline(parent, text) {
  text.split(INLINE).forEach((part, i) => {  // split with a group: odd parts are the matches
    if (!part) return;
    if (i % 2 === 0) { parent.append(document.createTextNode(part)); return; }
    const tag = part.startsWith("**") ? "strong" : part[0] === "`" ? "code" : "em";
    const e = document.createElement(tag);
    e.textContent = tag === "strong" ? part.slice(2, -2) : part.slice(1, -1);
    parent.append(e);
  });
}

function block(tag, text) {
  const e = document.createElement(tag);
  inline(e, text);
  return e;
}

export function renderMarkdown(text, container) {
  container.replaceChildren();
  let para = [], list = null;
  const flush = () => {
    if (para.length) { container.append(block("p", para.join(" "))); para = []; }
  };
  for (const raw of text.replace(/\r\n?/g, "\n").split("\n")) {
    const line = raw.trim();
    const heading = /^(#{1,3})\s+(.*)$/.exec(line);
    const bullet = /^[-*+]\s+(.*)$/.exec(line) || /^\d+[.)]\s+(.*)$/.exec(line);
    const kind = bullet ? (/^\d/.test(line) ? "ol" : "ul") : null;
    if (!line) { flush(); list = null; continue; }
    if (heading) { flush(); list = null; container.append(block("h" + (heading[1].length + 2), heading[2])); continue; }
    if (bullet) {
      flush();
      if (!list || list.tagName.toLowerCase() !== kind) { list = document.createElement(kind); container.append(list); }
      list.append(block("li", bullet[1]));
      continue;
    }
    list = null;  // a plain line ends a list and goes on the paragraph
    para.push(line);
  }
  flush();
}
