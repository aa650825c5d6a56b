// A few line icons drawn for this UI (24x24, stroked with the text colour).

const SVG = "http://www.w3.org/2000/svg";

const PATHS = {
  pencil: ["M4 20h4L19 9l-4-4L4 16z", "M13.5 6.5l4 4"],
  trash: ["M5 7h14", "M10 7V4.5h4V7", "M7 7l1 13h8l1-13", "M10.5 11v6M13.5 11v6"],
};

export function icon(name) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("class", "icon");
  for (const d of PATHS[name] || []) {
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}
